//! Reading records: a JSON array or NDJSON (one record per line).

use anyhow::{Context, Result, bail};
use fanout::convert::json_to_struct;
use fanout::domain::JsonMap;
use fanout::proto;
use serde::Deserialize;

/// One input record as users write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRecord {
    id: String,
    #[serde(default)]
    attributes: JsonMap,
}

impl From<InputRecord> for proto::Record {
    fn from(r: InputRecord) -> Self {
        proto::Record { id: r.id, attributes: Some(json_to_struct(r.attributes)) }
    }
}

/// Parses records from `text`: a JSON array of `{"id": …, "attributes": {…}}`
/// objects, or the same objects one per line (blank lines are skipped).
pub fn parse_records(text: &str) -> Result<Vec<proto::Record>> {
    if text.trim_start().starts_with('[') {
        let records: Vec<InputRecord> =
            serde_json::from_str(text).context("reading records as a JSON array")?;
        return Ok(records.into_iter().map(Into::into).collect());
    }
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: InputRecord =
            serde_json::from_str(line).with_context(|| format!("reading record on line {}", n + 1))?;
        records.push(r.into());
    }
    if records.is_empty() {
        bail!("no records in the input (expected a JSON array or one JSON object per line)");
    }
    Ok(records)
}

/// Reads the file at `path`, or stdin when `path` is `-`.
pub fn read_input(path: &str) -> Result<String> {
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
    }
}

/// `n` generated records `rec-00000`, `rec-00001`, … with no attributes
/// (so the digest workload gives each 10..=30 units).
pub fn generated_records(n: usize) -> Vec<proto::Record> {
    (0..n).map(|i| proto::Record { id: format!("rec-{i:05}"), attributes: None }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_and_ndjson() {
        let a = parse_records(r#"[{"id":"a","attributes":{"units":3}},{"id":"b"}]"#).unwrap();
        assert_eq!(a.len(), 2);
        let n = parse_records("{\"id\":\"a\"}\n\n{\"id\":\"b\",\"attributes\":{}}\n").unwrap();
        assert_eq!(n.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let e = parse_records("{\"id\":\"a\"}\n{\"idd\":\"b\"}").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        assert!(parse_records("\n").is_err());
    }
}
