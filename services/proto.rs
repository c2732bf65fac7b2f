//! Generated wire types of `fanout.v1` and the encoded descriptor set.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("fanout.v1");

/// Encoded `FileDescriptorSet` of `fanout.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fanout_descriptor");
