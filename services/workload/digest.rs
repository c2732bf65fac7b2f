//! The reference workload `digest`: deterministic, CPU-bound SHA-256 chains,
//! checkable bit for bit against `shared/seed/vectors.json`.
//!
//! - Units: `attributes.units` when present (an integer 1..=10000), else
//!   `10 + fnv1a64(id) % 21` (10..=30).
//! - Unit `i` hashes the UTF-8 bytes of `"{id}/{i}"` with SHA-256, then
//!   rehashes the digest `params.rounds` times (default 10000); its value is
//!   the first 8 bytes, big-endian.
//! - Output: `unit_count` (number), `xor_digest`, `min_unit`, `max_unit`
//!   (16 lowercase hex digits each).
//! - Limits: `params.rounds` over the instance's `max_rounds` (the
//!   processor's `--max-rounds`, default [`DEFAULT_MAX_ROUNDS`]) is
//!   `INVALID_ARGUMENT` naming the limit; a unit checks its record's
//!   cancellation every [`CANCEL_CHECK_ROUNDS`] rounds, so even a long one
//!   stops within about a millisecond of its record being cancelled.

use super::{Cancel, Workload, WorkloadError};
use crate::domain::{JsonMap, Record};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// Default `params.rounds`.
pub const DEFAULT_ROUNDS: u64 = 10_000;
/// Largest `attributes.units`.
pub const MAX_UNITS: u64 = 10_000;
/// Default largest `params.rounds` (about half a second of SHA-256 per unit
/// on one core of this project's machines).
pub const DEFAULT_MAX_ROUNDS: u64 = 1_000_000;
/// Rounds between two checks of the record's cancellation flag.
pub const CANCEL_CHECK_ROUNDS: u64 = 2_048;

/// The reference workload. See the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct Digest {
    /// Largest `params.rounds` accepted.
    pub max_rounds: u64,
}

impl Default for Digest {
    /// With [`DEFAULT_MAX_ROUNDS`].
    fn default() -> Self {
        Self { max_rounds: DEFAULT_MAX_ROUNDS }
    }
}

impl Digest {
    /// A digest workload accepting at most `max_rounds` rounds.
    pub fn with_max_rounds(max_rounds: u64) -> Self {
        Self { max_rounds }
    }
}

/// One unit of the digest workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestUnit {
    /// The bytes hashed first: `"{record_id}/{i}"`.
    pub input: String,
    /// Extra SHA-256 rounds.
    pub rounds: u64,
}

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The value of one unit: SHA-256 of `input`, rehashed `rounds` times, first
/// 8 bytes big-endian.
pub fn unit_value(input: &[u8], rounds: u64) -> u64 {
    unit_value_cancellable(input, rounds, &Cancel::new()).expect("never cancelled")
}

/// [`unit_value`], checking `cancel` every [`CANCEL_CHECK_ROUNDS`] rounds.
pub fn unit_value_cancellable(input: &[u8], rounds: u64, cancel: &Cancel) -> Result<u64, WorkloadError> {
    let mut d: [u8; 32] = Sha256::digest(input).into();
    let mut left = rounds;
    while left > 0 {
        let chunk = left.min(CANCEL_CHECK_ROUNDS);
        for _ in 0..chunk {
            d = Sha256::digest(d).into();
        }
        left -= chunk;
        if left > 0 {
            cancel.check()?;
        }
    }
    Ok(u64::from_be_bytes(d[..8].try_into().expect("32-byte digest")))
}

/// Units of a record with no `attributes.units`: 10..=30, from its id.
pub fn default_unit_count(id: &str) -> u64 {
    10 + fnv1a64(id.as_bytes()) % 21
}

/// A JSON number that is a whole number in `0..=2^53`, else `None`. (A
/// non-finite number never gets here: the processor refuses NaN and
/// Infinity when it converts the request.)
fn whole_number(v: &Value) -> Option<u64> {
    let f = v.as_f64()?;
    (f.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&f)).then_some(f as u64)
}

/// A JSON value for an error message: whole numbers without the `.0` that
/// protobuf's doubles give them.
fn shown(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

/// `params.rounds`, validated.
pub fn rounds(params: &JsonMap) -> Result<u64, WorkloadError> {
    match params.get("rounds") {
        None => Ok(DEFAULT_ROUNDS),
        Some(v) => whole_number(v).ok_or_else(|| {
            WorkloadError::invalid(
                "params.rounds",
                format!("must be a non-negative integer, got {}", shown(v)),
            )
        }),
    }
}

impl Workload for Digest {
    type Unit = DigestUnit;
    type Output = u64;

    fn name(&self) -> &str {
        "digest"
    }

    fn extract(&self, record: &Record, params: &JsonMap) -> Result<Vec<DigestUnit>, WorkloadError> {
        let rounds = rounds(params)?;
        if rounds > self.max_rounds {
            return Err(WorkloadError::invalid(
                "params.rounds",
                format!("{rounds} is over the limit of {} (set by --max-rounds)", self.max_rounds),
            ));
        }
        let count = match record.attributes.get("units") {
            None => default_unit_count(&record.id),
            Some(v) => whole_number(v).filter(|n| (1..=MAX_UNITS).contains(n)).ok_or_else(|| {
                WorkloadError::invalid(
                    "attributes.units",
                    format!("must be an integer from 1 to {MAX_UNITS}, got {}", shown(v)),
                )
            })?,
        };
        Ok((0..count).map(|i| DigestUnit { input: format!("{}/{i}", record.id), rounds }).collect())
    }

    fn process(&self, unit: DigestUnit, cancel: &Cancel) -> Result<u64, WorkloadError> {
        unit_value_cancellable(unit.input.as_bytes(), unit.rounds, cancel)
    }

    fn aggregate(&self, _record: &Record, values: Vec<u64>) -> Result<JsonMap, WorkloadError> {
        let hex = |v: u64| Value::String(format!("{v:016x}"));
        let xor = values.iter().fold(0, |a, v| a ^ v);
        let mut out = JsonMap::new();
        out.insert("unit_count".into(), values.len().into());
        out.insert("xor_digest".into(), hex(xor));
        out.insert("min_unit".into(), hex(values.iter().copied().min().unwrap_or(0)));
        out.insert("max_unit".into(), hex(values.iter().copied().max().unwrap_or(0)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vectors.json");
        let text = std::fs::read_to_string(path).expect("tests/data/vectors.json");
        serde_json::from_str(&text).unwrap()
    }

    fn record(v: &Value) -> Record {
        Record {
            id: v["id"].as_str().unwrap().into(),
            attributes: v["attributes"].as_object().cloned().unwrap_or_default(),
        }
    }

    fn run(r: &Record, rounds: u64) -> JsonMap {
        let mut params = JsonMap::new();
        params.insert("rounds".into(), rounds.into());
        let d = Digest::default();
        let units = d.extract(r, &params).unwrap();
        let values = units.into_iter().map(|u| d.process(u, &Cancel::new()).unwrap()).collect();
        d.aggregate(r, values).unwrap()
    }

    #[test]
    fn fnv_matches_vectors() {
        for v in vectors()["fnv1a64"].as_array().unwrap() {
            let got = format!("{:016x}", fnv1a64(v["input"].as_str().unwrap().as_bytes()));
            assert_eq!(got, v["hash_hex"].as_str().unwrap(), "fnv1a64({})", v["input"]);
        }
    }

    #[test]
    fn unit_values_match_vectors() {
        for v in vectors()["unit_values"].as_array().unwrap() {
            let got = unit_value(v["input"].as_str().unwrap().as_bytes(), v["rounds"].as_u64().unwrap());
            assert_eq!(format!("{got:016x}"), v["value_hex"].as_str().unwrap(), "{v}");
        }
    }

    #[test]
    fn records_match_vectors() {
        for v in vectors()["records"].as_array().unwrap() {
            let out = run(&record(v), v["rounds"].as_u64().unwrap());
            assert_eq!(out["unit_count"].as_u64(), v["unit_count"].as_u64(), "{v}");
            for k in ["xor_digest", "min_unit", "max_unit"] {
                assert_eq!(out[k], v[k], "{k} of {}", v["id"]);
            }
        }
    }

    #[test]
    fn run_digest_matches_vectors() {
        let spec = &vectors()["run_digest"];
        let n = spec["n_records"].as_u64().unwrap();
        let rounds = spec["rounds"].as_u64().unwrap();
        let mut lines = String::new();
        let mut total = 0;
        for i in 0..n {
            let r = Record { id: format!("rec-{i:05}"), attributes: JsonMap::new() };
            let o = run(&r, rounds);
            total += o["unit_count"].as_u64().unwrap();
            let s = |k: &str| o[k].as_str().unwrap().to_owned();
            lines += &format!(
                "{} {} {} {} {}\n",
                r.id,
                o["unit_count"],
                s("xor_digest"),
                s("min_unit"),
                s("max_unit")
            );
        }
        assert_eq!(total, spec["total_units"].as_u64().unwrap());
        let sha: [u8; 32] = Sha256::digest(lines.as_bytes()).into();
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, spec["sha256_hex"].as_str().unwrap());
    }

    #[test]
    fn bad_units_and_rounds_name_the_field() {
        let mut r = Record { id: "r".into(), attributes: JsonMap::new() };
        for bad in
            [serde_json::json!(0), serde_json::json!(10001), serde_json::json!(2.5), serde_json::json!("3")]
        {
            r.attributes.insert("units".into(), bad);
            let e = Digest::default().extract(&r, &JsonMap::new()).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("attributes.units"));
        }
        let r = Record { id: "r".into(), attributes: JsonMap::new() };
        for bad in [serde_json::json!(-1), serde_json::json!("x"), serde_json::json!(1.5)] {
            let mut p = JsonMap::new();
            p.insert("rounds".into(), bad);
            let e = Digest::default().extract(&r, &p).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("params.rounds"));
        }
        let mut p = JsonMap::new();
        p.insert("rounds".into(), serde_json::json!(1e12));
        let e = Digest::with_max_rounds(1000).extract(&r, &p).unwrap_err();
        assert!(e.to_string().contains("limit of 1000 (set by --max-rounds)"), "{e}");
    }

    #[test]
    fn a_cancelled_unit_stops() {
        let cancel = Cancel::new();
        cancel.cancel();
        let started = std::time::Instant::now();
        let e = unit_value_cancellable(b"r/0", u64::MAX, &cancel).unwrap_err();
        assert_eq!(e.kind, crate::workload::ErrorKind::Cancelled);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let cancel = Cancel::new();
        assert_eq!(unit_value_cancellable(b"r/0", 5000, &cancel).unwrap(), unit_value(b"r/0", 5000));
    }
}
