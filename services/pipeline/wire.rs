//! The pipeline's side of `ProcessRecord`: the request with its record and
//! params already encoded, so every call of a run shares one copy of the
//! params (and a retry shares its record's bytes) instead of re-encoding
//! and copying them per call.
//!
//! Protobuf encodes an embedded message exactly as a `bytes` field holding
//! that message's encoding, so this message is byte-for-byte a
//! `fanout.v1.ProcessRecordRequest` on the wire; cloning it bumps reference
//! counts.

use crate::proto;
use prost::Message;
use prost::bytes::Bytes;

/// `fanout.v1.ProcessRecordRequest` with `record` and `params` pre-encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessRecordWire {
    /// `run_id` (a string; UTF-8 checked when the run was accepted).
    #[prost(bytes = "bytes", tag = "1")]
    pub run_id: Bytes,
    /// The encoded `fanout.v1.Record`.
    #[prost(bytes = "bytes", tag = "2")]
    pub record: Bytes,
    /// `unit_mode`.
    #[prost(int32, tag = "3")]
    pub unit_mode: i32,
    /// The encoded `google.protobuf.Struct` of the run's params.
    #[prost(bytes = "bytes", tag = "4")]
    pub params: Bytes,
    /// 1-based attempt number.
    #[prost(uint32, tag = "5")]
    pub attempt: u32,
}

/// `fanout.v1.ProcessBatchRequest` with its records and params
/// pre-encoded, byte-for-byte the real message on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessBatchWire {
    /// `run_id`.
    #[prost(bytes = "bytes", tag = "1")]
    pub run_id: Bytes,
    /// The encoded `fanout.v1.Record`s.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub records: Vec<Bytes>,
    /// `unit_mode`.
    #[prost(int32, tag = "3")]
    pub unit_mode: i32,
    /// The encoded `google.protobuf.Struct` of the run's params.
    #[prost(bytes = "bytes", tag = "4")]
    pub params: Bytes,
    /// Each record's 1-based attempt number.
    #[prost(uint32, repeated, tag = "5")]
    pub attempts: Vec<u32>,
    /// Each record's time bound on the processor.
    #[prost(message, optional, tag = "6")]
    pub record_timeout: Option<prost_types::Duration>,
}

/// Encodes a record once, for every attempt it will take.
pub fn encode_record(record: &proto::Record) -> Bytes {
    Bytes::from(record.encode_to_vec())
}

/// Encodes a run's params once, for every call of the run.
pub fn encode_params(params: &prost_types::Struct) -> Bytes {
    Bytes::from(params.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_as_the_real_request() {
        let record = proto::Record {
            id: "r-1".into(),
            attributes: Some(prost_types::Struct {
                fields: [(
                    "units".to_owned(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(3.0)) },
                )]
                .into(),
            }),
        };
        let params = prost_types::Struct {
            fields: [(
                "rounds".to_owned(),
                prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(7.0)) },
            )]
            .into(),
        };
        let wire = ProcessRecordWire {
            run_id: Bytes::from_static(b"run-1"),
            record: encode_record(&record),
            unit_mode: proto::UnitMode::Sequential as i32,
            params: encode_params(&params),
            attempt: 2,
        };
        let batch = ProcessBatchWire {
            run_id: wire.run_id.clone(),
            records: vec![wire.record.clone(), wire.record.clone()],
            unit_mode: wire.unit_mode,
            params: wire.params.clone(),
            attempts: vec![1, 3],
            record_timeout: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
        };
        let real_batch = proto::ProcessBatchRequest::decode(batch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(real_batch.records, [record.clone(), record.clone()]);
        assert_eq!(real_batch.attempts, [1, 3]);
        assert_eq!(real_batch.params.as_ref(), Some(&params));
        let real = proto::ProcessRecordRequest::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            real,
            proto::ProcessRecordRequest {
                run_id: "run-1".into(),
                record: Some(record),
                unit_mode: proto::UnitMode::Sequential as i32,
                params: Some(params),
                attempt: 2,
            }
        );
    }
}
