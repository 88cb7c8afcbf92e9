//! A private Apache Kafka cluster for a fault test (scripts/kafka.sh).
