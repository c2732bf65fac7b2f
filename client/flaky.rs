//! `fanout demo --flaky`: a workload whose attempts fail now and then, so
//! a demo shows retries and failures (e.g. in its `--timeline`).

use fanout::domain::{JsonMap, Record};
use fanout::workload::{Cancel, Workload, WorkloadError};

/// `inner`, with each attempt failing transiently (so the pipeline retries
/// it) with probability `percent` / 100, after its units ran, so a failed
/// attempt takes as long as a good one.
pub struct Flaky<W> {
    inner: W,
    percent: f64,
}

impl<W> Flaky<W> {
    /// `inner` failing `percent` % of its attempts (0 never fails).
    pub fn new(inner: W, percent: f64) -> Self {
        Self { inner, percent }
    }
}

/// A `--flaky` value: a percentage from 0 to 100.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("expected a percentage from 0 to 100, got {s:?}")),
    }
}

impl<W: Workload> Workload for Flaky<W> {
    type Unit = W::Unit;
    type Output = W::Output;

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn extract(&self, record: &Record, params: &JsonMap) -> Result<Vec<W::Unit>, WorkloadError> {
        self.inner.extract(record, params)
    }

    fn process(&self, unit: W::Unit, cancel: &Cancel) -> Result<W::Output, WorkloadError> {
        self.inner.process(unit, cancel)
    }

    fn aggregate(&self, record: &Record, outputs: Vec<W::Output>) -> Result<JsonMap, WorkloadError> {
        if self.percent > 0.0 && fastrand::f64() * 100.0 < self.percent {
            return Err(WorkloadError::transient(format!(
                "injected failure (fanout demo --flaky {}%)",
                self.percent
            )));
        }
        self.inner.aggregate(record, outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout::workload::Digest;

    #[test]
    fn fails_all_none_or_some() {
        let record = Record { id: "r".into(), attributes: JsonMap::new() };
        let outcome = |percent| Flaky::new(Digest::default(), percent).aggregate(&record, vec![1, 2]);
        assert!(outcome(0.0).is_ok());
        let e = outcome(100.0).unwrap_err();
        assert!(e.message.contains("--flaky 100%"), "{}", e.message);
        assert!(parse_percent("101").is_err() && parse_percent("x").is_err());
        assert_eq!(parse_percent("12.5"), Ok(12.5));
    }
}
