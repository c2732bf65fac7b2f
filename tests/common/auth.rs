//! Helpers of the bearer-token tests: token files that are replaced
//! atomically (as a secret mount is), requests carrying a token, a wait on
//! a token file's reload signal, and a `Run` collected whatever its end.

use super::WAIT;
use fanout::auth::{Reloads, TokenFile};
use fanout::proto;
use fanout::proto::pipeline_client::PipelineClient;
use fanout::proto::run_event::Event;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::transport::Channel;

/// A fresh directory for one test's files, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fanout-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `file` with `text` (atomically: a new file renamed over it).
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        replace(&path, text);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` with `text` by renaming a new file over it.
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `msg` as a request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// The reload counts of `file` now.
pub fn reloads(file: &TokenFile) -> Reloads {
    *file.reloads().borrow()
}

/// Waits (under [`WAIT`]) until `file`'s reload counts satisfy `cond`.
pub async fn wait_reload(file: &TokenFile, what: &str, cond: impl Fn(&Reloads) -> bool) {
    let mut rx = file.reloads();
    tokio::time::timeout(WAIT, rx.wait_for(|r| cond(r)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the token file's reload: {what}"))
        .expect("token file dropped");
}

/// Calls `Run` with `req` and collects its records and report (under
/// [`WAIT`]); `Err` when the call is refused before any event.
pub async fn run_collect(
    client: &mut PipelineClient<Channel>,
    req: tonic::Request<proto::RunRequest>,
) -> Result<(Vec<proto::RecordResult>, proto::RunReport), tonic::Status> {
    let call = async {
        let mut stream = client.run(req).await?.into_inner();
        let mut records = Vec::new();
        loop {
            match stream.message().await?.expect("stream ended before the report").event {
                Some(Event::Record(r)) => records.push(r),
                Some(Event::Report(r)) => return Ok((records, r)),
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, call).await.expect("run timed out")
}
