//! Helper threads a batch of requests is spread over (`io-threads`).
//!
//! Started once with the device and fed through channels, not spawned
//! per batch: a thread start inside the nested test environment costs
//! more than the 4 KiB read it would run. A job is a `'static` closure
//! (it owns its requests and a handle on the device), so no borrow
//! crosses into a helper and no `unsafe` is needed.

use std::sync::mpsc;
use std::thread::JoinHandle;

/// One unit of work for a helper.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Up to `n` helper threads, each with its own queue of jobs.
pub struct Pool {
    helpers: Vec<(mpsc::Sender<Job>, JoinHandle<()>)>,
}

impl Pool {
    /// Starts `n` helpers named `name`. One that cannot be started is left
    /// out (the pool is smaller; the caller runs more itself).
    pub fn new(n: usize, name: &str) -> Pool {
        let helpers = (0..n)
            .filter_map(|_| {
                let (tx, rx) = mpsc::channel::<Job>();
                let handle = std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .ok()?;
                Some((tx, handle))
            })
            .collect();
        Pool { helpers }
    }

    /// How many helpers run.
    pub fn len(&self) -> usize {
        self.helpers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.helpers.is_empty()
    }

    /// Gives `job` to helper `i`; a helper that is gone (a job of its
    /// panicked) or past the pool's size hands it back to run here.
    pub fn run(&self, i: usize, job: Job) -> Result<(), Job> {
        match self.helpers.get(i) {
            Some((tx, _)) => tx.send(job).map_err(|mpsc::SendError(job)| job),
            None => Err(job),
        }
    }
}

impl Drop for Pool {
    /// Closes every queue, then waits for the helpers to finish the jobs
    /// they hold.
    fn drop(&mut self) {
        let handles: Vec<_> = self.helpers.drain(..).map(|(_, h)| h).collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_helpers_and_come_back_when_one_is_gone() {
        let pool = Pool::new(2, "test-helper");
        assert_eq!(pool.len(), 2);
        let (tx, rx) = mpsc::channel();
        for i in 0..2 {
            let tx = tx.clone();
            let job: Job = Box::new(move || {
                let _ = tx.send((i, std::thread::current().name().map(String::from)));
            });
            assert!(pool.run(i, job).is_ok());
        }
        let mut got: Vec<_> = (0..2).filter_map(|_| rx.recv().ok()).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (0, Some("test-helper".into())),
                (1, Some("test-helper".into()))
            ]
        );
        // A helper whose job panicked is gone: the next job comes back.
        assert!(pool.run(0, Box::new(|| panic!("a broken request"))).is_ok());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match pool.run(0, Box::new(|| {})) {
                Err(_) => break,
                Ok(()) => assert!(std::time::Instant::now() < deadline, "the helper lives on"),
            }
            std::thread::yield_now();
        }
        assert!(
            pool.run(5, Box::new(|| {})).is_err(),
            "past the pool's size"
        );
    }
}
