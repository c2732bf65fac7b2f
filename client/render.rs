//! Rendering a report: JSON for machines (proto field names, enum names,
//! RFC 3339 timestamps, durations as `"1.5s"`), a table for people.

use fanout::convert::struct_to_json;
use fanout::proto;
use serde_json::{Value, json};

fn duration(d: &Option<prost_types::Duration>) -> Value {
    d.as_ref().map_or(Value::Null, |d| Value::String(d.to_string()))
}

fn seconds(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref().map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// One record result as JSON.
pub fn result_json(r: &proto::RecordResult) -> Value {
    let mut v = json!({
        "record_id": r.record_id,
        "index": r.index,
        "status": r.status().as_str_name(),
        "units_processed": r.units_processed,
        "attempts": r.attempts,
        "processor": r.processor,
        "elapsed": duration(&r.elapsed),
    });
    if let Some(out) = &r.output {
        v["output"] = Value::Object(struct_to_json(out.clone()));
    }
    if let Some(e) = &r.error {
        v["error"] = json!({"code": e.code, "code_name": e.code_name, "message": e.message});
    }
    v
}

/// The whole report as JSON; `failures_omitted` appears only when non-zero
/// (a `RunStream` report with more failures than it carries).
pub fn report_json(r: &proto::RunReport) -> Value {
    let s = r.summary.unwrap_or_default();
    let mut v = json!({
        "run_id": r.run_id,
        "status": r.status().as_str_name(),
        "summary": {
            "total_records_processed": s.total_records_processed,
            "total_units_processed": s.total_units_processed,
            "average_units_per_record": s.average_units_per_record,
            "records_succeeded": s.records_succeeded,
            "records_failed": s.records_failed,
            "retries": s.retries,
        },
        "results": r.results.iter().map(result_json).collect::<Vec<_>>(),
        "generated_at": r.generated_at.as_ref().map(|t| t.to_string()),
        "elapsed": duration(&r.elapsed),
    });
    if r.failures_omitted > 0 {
        v["failures_omitted"] = r.failures_omitted.into();
    }
    v
}

/// A readable summary: status, totals, rate, and each failed record.
pub fn report_table(r: &proto::RunReport) -> String {
    let s = r.summary.unwrap_or_default();
    let secs = seconds(&r.elapsed);
    let rate = if secs > 0.0 { s.total_records_processed as f64 / secs } else { 0.0 };
    let mut out = format!(
        "run       {}\nstatus    {}\nrecords   {} processed: {} succeeded, {} failed ({} retries)\n\
         units     {} ({:.1} per record)\nelapsed   {:.3}s ({:.0} records/s)\ngenerated {}\n",
        r.run_id,
        r.status().as_str_name().trim_start_matches("RUN_STATUS_"),
        s.total_records_processed,
        s.records_succeeded,
        s.records_failed,
        s.retries,
        s.total_units_processed,
        s.average_units_per_record,
        secs,
        rate,
        r.generated_at.as_ref().map(|t| t.to_string()).unwrap_or_default(),
    );
    let failed: Vec<_> = r.results.iter().filter(|x| x.error.is_some()).collect();
    if !failed.is_empty() {
        out += &format!("\n{:>6}  {:<16} {:<20} {:>8}  message\n", "index", "record", "code", "attempts");
        for x in failed {
            let e = x.error.as_ref().expect("filtered on error");
            out += &format!(
                "{:>6}  {:<16} {:<20} {:>8}  {}\n",
                x.index, x.record_id, e.code_name, x.attempts, e.message
            );
        }
    }
    if r.failures_omitted > 0 {
        out += &format!(
            "… and {} more failed record(s), left out of the report (each was sent as a record event; \
             see --output)\n",
            r.failures_omitted
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omitted_failures_are_mentioned() {
        let failure = proto::RecordResult {
            record_id: "r7".into(),
            index: 7,
            status: proto::RecordStatus::Failed as i32,
            error: Some(proto::Error { code: 13, code_name: "INTERNAL".into(), message: "bad".into() }),
            ..Default::default()
        };
        let mut report = proto::RunReport { results: vec![failure], ..Default::default() };
        assert!(report_table(&report).contains("r7"));
        assert!(!report_table(&report).contains("more failed"));
        assert!(report_json(&report).get("failures_omitted").is_none());
        report.failures_omitted = 1234;
        assert!(report_table(&report).contains("1234 more failed record(s)"), "{}", report_table(&report));
        assert_eq!(report_json(&report)["failures_omitted"], 1234);
    }
}
