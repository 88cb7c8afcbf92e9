// @generated automatically by Diesel CLI.

pub mod kser {
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
        }
    }

    diesel::joinable!(outbox -> operations (operation_uuid));
    diesel::joinable!(tasks -> operations (operation_uuid));

    diesel::allow_tables_to_appear_in_same_query!(operations, outbox, tasks,);
}
