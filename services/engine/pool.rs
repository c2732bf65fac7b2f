//! A fixed set of OS threads for CPU-bound units.
//!
//! Units never run on the async workers. Instead of tokio's blocking pool
//! (up to 512 threads, one wake-up handoff per task, plus a semaphore to bound
//! it), a processor owns exactly `threads` threads pulling jobs off one
//! queue: the thread count is the bound on CPU-bound work, and a thread that
//! finishes a unit takes the next without parking while work is queued.

use crate::error::Error;
use crossbeam_channel::{Receiver, Sender, unbounded};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// `threads` OS threads running submitted closures in FIFO order. The
/// threads exit once the pool is dropped and the queue has drained.
#[derive(Debug)]
pub struct UnitPool {
    jobs: Sender<Job>,
    /// Kept to count waiting jobs (a receiver does not keep the threads alive).
    queue: Receiver<Job>,
}

impl UnitPool {
    /// Starts `threads` (at least 1) threads named `{name}-{i}`.
    pub fn new(threads: usize, name: &str) -> Self {
        let threads = threads.max(1);
        let (jobs, queue) = unbounded::<Job>();
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        // Jobs catch their own panics; this keeps the thread
                        // alive even if one does not.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .expect("spawning a unit thread");
        }
        Self { jobs, queue }
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Runs `work` on a pool thread and waits for its result. Dropping the
    /// returned future does not stop a job already queued; the job should
    /// check a cancellation flag before doing anything costly.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(work());
            }))
            .map_err(|_| Error::Internal("the unit pool has shut down".into()))?;
        rx.await.map_err(|_| Error::Internal("a unit job ended without a result".into()))
    }
}

/// The results of a batch of jobs, and who to wake when the last is in.
struct Batch<T> {
    slots: Vec<Mutex<Option<T>>>,
    remaining: AtomicUsize,
    done: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// Counts a job of a batch as finished when dropped, so that a job that
/// panicked still lets the batch complete (with its slot left empty).
struct Finished<T>(Arc<Batch<T>>);

impl<T> Drop for Finished<T> {
    fn drop(&mut self) {
        if self.0.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(done) = self.0.done.lock().expect("batch lock").take()
        {
            let _ = done.send(());
        }
    }
}

impl UnitPool {
    /// Runs every job on the pool threads, concurrently, and waits for all
    /// of them: the results come back in job order. The waiting task is
    /// woken once, when the last job finishes, not once per job. A job
    /// that panicked yields `None`.
    pub async fn run_all<T, F>(&self, jobs: Vec<F>) -> Result<Vec<Option<T>>, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = Arc::new(Batch {
            slots: jobs.iter().map(|_| Mutex::new(None)).collect(),
            remaining: AtomicUsize::new(jobs.len()),
            done: Mutex::new(Some(tx)),
        });
        for (i, job) in jobs.into_iter().enumerate() {
            let finished = Finished(batch.clone());
            self.jobs
                .send(Box::new(move || {
                    let out = job();
                    *finished.0.slots[i].lock().expect("slot lock") = Some(out);
                }))
                .map_err(|_| Error::Internal("the unit pool has shut down".into()))?;
        }
        rx.await.map_err(|_| Error::Internal("a batch of unit jobs ended without a result".into()))?;
        Ok(batch.slots.iter().map(|s| s.lock().expect("slot lock").take()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn runs_jobs_on_at_most_n_threads() {
        let pool = UnitPool::new(2, "test-unit");
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..16).map(|i| {
            let (running, peak) = (running.clone(), peak.clone());
            pool.run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::yield_now();
                running.fetch_sub(1, Ordering::SeqCst);
                assert!(std::thread::current().name().unwrap().starts_with("test-unit-"));
                i * 2
            })
        });
        let out: Vec<usize> = futures::future::try_join_all(jobs).await.unwrap();
        assert_eq!(out, (0..16).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 2);
    }

    #[tokio::test]
    async fn run_all_returns_in_order_even_past_a_panic() {
        let pool = UnitPool::new(2, "test-unit");
        let jobs: Vec<Box<dyn FnOnce() -> usize + Send>> = (0..10)
            .map(|i: usize| Box::new(move || if i == 3 { panic!("boom") } else { i * 10 }) as Box<_>)
            .collect();
        let out = pool.run_all(jobs).await.unwrap();
        let want: Vec<Option<usize>> = (0..10).map(|i| (i != 3).then_some(i * 10)).collect();
        assert_eq!(out, want);
        assert!(pool.run_all(Vec::<fn() -> u8>::new()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_its_thread() {
        let pool = UnitPool::new(1, "test-unit");
        assert!(pool.run(|| panic!("boom")).await.is_err());
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }
}
