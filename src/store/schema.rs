// @generated automatically by Diesel CLI.

pub mod kser {
    diesel::table! {
        kser.dead_letters (id) {
            id -> Int8,
            dlq_topic -> Text,
            topic -> Text,
            kafka_partition -> Int4,
            kafka_offset -> Int8,
            kafka_timestamp -> Nullable<Int8>,
            error_kind -> Text,
            error -> Text,
            attempts -> Int4,
            uuid -> Nullable<Text>,
            producer_error -> Text,
            key -> Nullable<Bytea>,
            value -> Nullable<Bytea>,
            created_at -> Timestamptz,
        }
    }

    diesel::table! {
        kser.operations (uuid) {
            uuid -> Text,
            entrypoint -> Text,
            status -> Text,
            params -> Jsonb,
            metadata -> Jsonb,
            result -> Nullable<Jsonb>,
            error -> Nullable<Text>,
            steps -> Int4,
            worker -> Nullable<Text>,
            topic -> Nullable<Text>,
            enqueued_at -> Nullable<Timestamptz>,
            created_at -> Timestamptz,
            started_at -> Nullable<Timestamptz>,
            finished_at -> Nullable<Timestamptz>,
            updated_at -> Timestamptz,
            graph -> Bool,
        }
    }

    diesel::table! {
        kser.outbox (id) {
            id -> Int8,
            topic -> Text,
            message_key -> Nullable<Text>,
            payload -> Text,
            operation_uuid -> Nullable<Text>,
            created_at -> Timestamptz,
            claimed_until -> Nullable<Timestamptz>,
            available_at -> Timestamptz,
        }
    }

    diesel::table! {
        kser.steps (task_uuid) {
            task_uuid -> Text,
            operation_uuid -> Text,
            name -> Text,
            after -> Array<Text>,
            join_any -> Bool,
            on_failure -> Text,
            delay_ms -> Int8,
            recovery -> Text,
            compensation -> Nullable<Jsonb>,
            compensates -> Bool,
        }
    }

    diesel::table! {
        kser.task_attempts (task_uuid, attempt) {
            task_uuid -> Text,
            attempt -> Int4,
            worker -> Nullable<Text>,
            started_at -> Nullable<Timestamptz>,
            finished_at -> Timestamptz,
            retcode -> Nullable<Int4>,
            error -> Nullable<Text>,
        }
    }

    diesel::table! {
        kser.task_minutes (minute, entrypoint, status, shard) {
            minute -> Timestamptz,
            entrypoint -> Text,
            status -> Text,
            shard -> Int2,
            tasks -> Int8,
            last_error -> Nullable<Text>,
            last_at -> Timestamptz,
        }
    }

    diesel::table! {
        kser.tasks (uuid) {
            uuid -> Text,
            entrypoint -> Text,
            status -> Text,
            params -> Jsonb,
            metadata -> Jsonb,
            result -> Nullable<Jsonb>,
            error -> Nullable<Text>,
            attempts -> Int4,
            worker -> Nullable<Text>,
            topic -> Nullable<Text>,
            kafka_partition -> Nullable<Int4>,
            kafka_offset -> Nullable<Int8>,
            enqueued_at -> Nullable<Timestamptz>,
            created_at -> Timestamptz,
            started_at -> Nullable<Timestamptz>,
            finished_at -> Nullable<Timestamptz>,
            updated_at -> Timestamptz,
            operation_uuid -> Nullable<Text>,
            position -> Nullable<Int4>,
            next_attempt_at -> Nullable<Timestamptz>,
        }
    }

    diesel::joinable!(outbox -> operations (operation_uuid));
    diesel::joinable!(steps -> operations (operation_uuid));
    diesel::joinable!(steps -> tasks (task_uuid));
    diesel::joinable!(task_attempts -> tasks (task_uuid));
    diesel::joinable!(tasks -> operations (operation_uuid));

    diesel::allow_tables_to_appear_in_same_query!(
        dead_letters,
        operations,
        outbox,
        steps,
        task_attempts,
        task_minutes,
        tasks,
    );
}
