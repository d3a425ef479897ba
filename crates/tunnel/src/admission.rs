//! Admission of connections that have not authenticated yet.
//!
//! Every agent port is public, so anyone can open connections and say nothing. A hard cap that
//! refuses newcomers would let 64 silent sockets, reopened every auth deadline, lock the real
//! user out for good. Here a newcomer over the cap evicts the *oldest* unauthenticated
//! connection instead: a real client authenticates within a round trip or two of connecting,
//! so to keep it out a flood must open `cap` connections per round trip, not 64 per deadline.
//! And a connection that has sent its upgrade request goes after every one that has not: a
//! flood of bare connections (9,000 a second from one script evicted every real client in a
//! review) then cannot touch a client waiting for its AUTH verdict; it must complete HTTP
//! upgrades as fast.
//!
//! ```text
//! accept ──admit()──▶ Slot ──(authenticated)──▶ settle() ─▶ leaves the queue
//!             │                  ▲
//!             └─ queue full: oldest Slot's `evicted()` fires, its connection closes
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The queue of unauthenticated connections, oldest first.
#[derive(Debug)]
pub(crate) struct Admission {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    queue: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    evicted: CancellationToken,
    /// The upgrade request arrived: evicted only when no connection without one is left.
    upgraded: bool,
}

/// One unauthenticated connection's place in the queue; leaves it when dropped or settled.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    evicted: CancellationToken,
    admission: Arc<Admission>,
}

impl Admission {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            inner: Mutex::default(),
        })
    }

    /// Takes a place for a new connection, evicting one when the queue is full: the oldest
    /// that has not sent its upgrade request, else the oldest. Returns whether someone was
    /// evicted.
    pub(crate) fn admit(self: &Arc<Self>) -> (Slot, bool) {
        let mut inner = self.lock();
        let mut evicted = false;
        while inner.queue.len() >= self.cap {
            let victim = inner.queue.iter().position(|e| !e.upgraded).unwrap_or(0);
            if let Some(e) = inner.queue.remove(victim) {
                e.evicted.cancel();
                evicted = true;
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let token = CancellationToken::new();
        inner.queue.push_back(Entry {
            id,
            evicted: token.clone(),
            upgraded: false,
        });
        let slot = Slot {
            id,
            evicted: token,
            admission: self.clone(),
        };
        (slot, evicted)
    }

    /// Connections waiting to authenticate now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether the next newcomer evicts someone.
    pub(crate) fn is_full(&self) -> bool {
        self.lock().queue.len() >= self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_upgraded(&self, id: u64) {
        if let Some(e) = self.lock().queue.iter_mut().find(|e| e.id == id) {
            e.upgraded = true;
        }
    }

    fn remove(&self, id: u64) -> bool {
        let mut inner = self.lock();
        match inner.queue.iter().position(|e| e.id == id) {
            Some(at) => {
                inner.queue.remove(at);
                true
            }
            None => false,
        }
    }
}

impl Slot {
    /// Runs `work` unless a newer connection takes this one's place first (then `None`).
    pub(crate) async fn unless_evicted<F: std::future::Future>(
        &self,
        work: F,
    ) -> Option<F::Output> {
        tokio::select! {
            _ = self.evicted.cancelled() => None,
            out = work => Some(out),
        }
    }

    /// The connection sent its upgrade request: it now goes after those that have not.
    pub(crate) fn upgraded(&self) {
        self.admission.mark_upgraded(self.id);
    }

    /// Leaves the queue for good because the connection authenticated. `false` when it was
    /// evicted first: eviction and authentication can race, and the eviction already counted.
    pub(crate) fn settle(self) -> bool {
        // Drop runs `remove` again and finds nothing: harmless.
        self.admission.remove(self.id)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcomer_over_the_cap_evicts_the_oldest() {
        let a = Admission::new(2);
        let (first, e1) = a.admit();
        let (second, e2) = a.admit();
        assert!(!e1 && !e2);
        let (third, e3) = a.admit();
        assert!(e3, "the third connection must make room");
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert_eq!(a.waiting(), 2);
        assert!(!first.settle(), "an evicted connection cannot authenticate");
        assert!(second.settle());
        assert_eq!(a.waiting(), 1);
        drop(third);
        assert_eq!(a.waiting(), 0);
    }

    #[test]
    fn upgraded_connections_are_evicted_last() {
        let a = Admission::new(3);
        let (client, _) = a.admit();
        client.upgraded();
        // A flood of bare connections churns among itself.
        let mut flood = Vec::new();
        for _ in 0..100 {
            flood.push(a.admit().0);
        }
        assert!(
            !client.evicted.is_cancelled(),
            "the upgraded client was evicted"
        );
        assert_eq!(
            flood.iter().filter(|s| !s.evicted.is_cancelled()).count(),
            2
        );
        assert!(client.settle());
        // With only upgraded ones waiting, the oldest of them goes.
        let b = Admission::new(2);
        let (first, _) = b.admit();
        let (second, _) = b.admit();
        first.upgraded();
        second.upgraded();
        let (_third, evicted) = b.admit();
        assert!(evicted && first.evicted.is_cancelled() && !second.evicted.is_cancelled());
    }

    #[test]
    fn finished_connections_free_their_place_without_evicting() {
        let a = Admission::new(1);
        let (first, _) = a.admit();
        drop(first);
        let (second, evicted) = a.admit();
        assert!(!evicted);
        assert!(!second.evicted.is_cancelled());
    }
}
