// @generated automatically by Diesel CLI.

pub mod kser {
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
        }
    }
}
