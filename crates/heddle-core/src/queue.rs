//! The aging priority queue of waiting requests.
//!
//! A request's effective priority at time `now` is `base − (now − arrival) × rate`: the
//! longer it waits, the more urgent it gets (with the default rate 0.1/s, LOW reaches
//! NORMAL after 10 s and HIGH after 20 s). Comparing two requests at any common `now`
//! gives the same order as comparing the time-invariant keys `base + arrival × rate`, so
//! the queue is an ordered map on that key: every operation is O(log n) and nothing is
//! re-sorted as time passes. Ties go to the earlier arrival (FIFO), then to insertion order.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use crate::request::{Priority, RequestId};

/// The default aging rate: priority levels gained per second of waiting.
pub const DEFAULT_AGING_RATE: f64 = 0.1;

const SCORE_SCALE: f64 = 1e9;

/// Orders requests by urgency; the smallest key is the most urgent.
#[derive(Debug, Clone, Copy)]
pub struct UrgencyKey {
    /// `base + arrival × rate` in billionths of a priority level: integer so that two
    /// requests whose effective priorities are equal up to float noise compare equal and
    /// fall back to FIFO.
    score: i64,
    arrival: f64,
    seq: u64,
}

impl UrgencyKey {
    /// `seq` breaks exact ties (same score and arrival) in insertion order.
    pub fn new(priority: Priority, arrival: f64, rate: f64, seq: u64) -> Self {
        UrgencyKey {
            score: ((f64::from(priority.value()) + arrival * rate) * SCORE_SCALE).round() as i64,
            arrival,
            seq,
        }
    }

    /// Whether `self` is strictly more urgent than `other` by effective priority alone
    /// (ties in priority are not "more urgent", whatever the arrival order).
    pub fn strictly_more_urgent(&self, other: &UrgencyKey) -> bool {
        self.score < other.score
    }
}

impl PartialEq for UrgencyKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for UrgencyKey {}

impl PartialOrd for UrgencyKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UrgencyKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .cmp(&other.score)
            .then(self.arrival.total_cmp(&other.arrival))
            .then(self.seq.cmp(&other.seq))
    }
}

/// The effective priority of a request that arrived at `arrival`, seen at `now`.
pub fn effective_priority(priority: Priority, arrival: f64, now: f64, rate: f64) -> f64 {
    f64::from(priority.value()) - (now - arrival).max(0.0) * rate
}

#[derive(Debug)]
struct Entry<T> {
    id: RequestId,
    priority: Priority,
    arrival: f64,
    item: T,
}

/// What happened to a request offered to a bounded queue.
#[derive(Debug, PartialEq)]
pub enum PutOutcome<T> {
    /// Queued; nothing else changed.
    Queued,
    /// Queued by displacing the least urgent waiting request, returned here so that its
    /// client can be told.
    Displaced(RequestId, T),
    /// The queue is full and the newcomer is not strictly more urgent than anyone in it;
    /// the item comes back.
    Refused(T),
}

/// Waiting requests ordered by aging priority.
#[derive(Debug)]
pub struct AgingQueue<T> {
    rate: f64,
    capacity: Option<usize>,
    order: BTreeMap<UrgencyKey, Entry<T>>,
    keys: FxHashMap<RequestId, UrgencyKey>,
    per_priority: [usize; 3],
    next_seq: u64,
}

impl<T> AgingQueue<T> {
    /// `rate` is in priority levels per second; `capacity` bounds `put` (not `requeue`).
    pub fn new(rate: f64, capacity: Option<usize>) -> Self {
        AgingQueue {
            rate,
            capacity,
            order: BTreeMap::new(),
            keys: FxHashMap::default(),
            per_priority: [0; 3],
            next_seq: 0,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, id: RequestId) -> bool {
        self.keys.contains_key(&id)
    }

    /// The urgency key of a waiting request.
    pub fn key(&self, id: RequestId) -> Option<UrgencyKey> {
        self.keys.get(&id).copied()
    }

    /// Waiting requests by their base priority: [high, normal, low].
    pub fn len_per_priority(&self) -> [usize; 3] {
        self.per_priority
    }

    /// The key a request with this priority and arrival gets.
    pub fn key_for(&self, priority: Priority, arrival: f64) -> UrgencyKey {
        UrgencyKey::new(priority, arrival, self.rate, self.next_seq)
    }

    /// Offers a new request. When the queue is at capacity, the newcomer displaces the
    /// least urgent waiting request only if it is strictly more urgent. Ids must be
    /// unique; the caller checks.
    pub fn put(
        &mut self,
        id: RequestId,
        priority: Priority,
        arrival: f64,
        item: T,
    ) -> PutOutcome<T> {
        debug_assert!(!self.keys.contains_key(&id), "request {id} queued twice");
        let key = self.key_for(priority, arrival);
        if self.capacity.is_some_and(|cap| self.order.len() >= cap) {
            let least_urgent = self.order.last_key_value().map(|(k, _)| *k);
            match least_urgent {
                Some(victim) if key.strictly_more_urgent(&victim) => {
                    let entry = self.take(victim);
                    self.insert(key, id, priority, arrival, item);
                    return PutOutcome::Displaced(entry.id, entry.item);
                }
                _ => return PutOutcome::Refused(item),
            }
        }
        self.insert(key, id, priority, arrival, item);
        PutOutcome::Queued
    }

    /// Puts back a request that was already admitted once (a preempted one), ignoring the
    /// capacity: work already accepted is never dropped. It keeps its arrival, so it
    /// keeps aging.
    pub fn requeue(&mut self, id: RequestId, priority: Priority, arrival: f64, item: T) {
        debug_assert!(!self.keys.contains_key(&id), "request {id} queued twice");
        let key = self.key_for(priority, arrival);
        self.insert(key, id, priority, arrival, item);
    }

    /// The most urgent request and its key.
    pub fn peek(&self) -> Option<(RequestId, &T, UrgencyKey)> {
        self.order
            .first_key_value()
            .map(|(key, entry)| (entry.id, &entry.item, *key))
    }

    pub fn pop(&mut self) -> Option<(RequestId, T)> {
        let key = *self.order.first_key_value()?.0;
        let entry = self.take(key);
        Some((entry.id, entry.item))
    }

    /// Removes a request wherever it is (cancellation).
    pub fn remove(&mut self, id: RequestId) -> Option<T> {
        let key = *self.keys.get(&id)?;
        Some(self.take(key).item)
    }

    /// Requests from most to least urgent, with their keys.
    pub fn iter(&self) -> impl Iterator<Item = (RequestId, &T, UrgencyKey)> {
        self.order
            .iter()
            .map(|(key, entry)| (entry.id, &entry.item, *key))
    }

    /// The effective priority of a waiting request at `now`.
    pub fn effective_priority(&self, id: RequestId, now: f64) -> Option<f64> {
        let key = self.keys.get(&id)?;
        let entry = &self.order[key];
        Some(effective_priority(
            entry.priority,
            entry.arrival,
            now,
            self.rate,
        ))
    }

    fn insert(
        &mut self,
        key: UrgencyKey,
        id: RequestId,
        priority: Priority,
        arrival: f64,
        item: T,
    ) {
        self.next_seq += 1;
        self.per_priority[priority as usize] += 1;
        self.keys.insert(id, key);
        self.order.insert(
            key,
            Entry {
                id,
                priority,
                arrival,
                item,
            },
        );
    }

    fn take(&mut self, key: UrgencyKey) -> Entry<T> {
        let entry = self.order.remove(&key).expect("queue index out of sync");
        self.keys.remove(&entry.id);
        self.per_priority[entry.priority as usize] -= 1;
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn queue() -> AgingQueue<()> {
        AgingQueue::new(DEFAULT_AGING_RATE, None)
    }

    fn drain(q: &mut AgingQueue<()>) -> Vec<RequestId> {
        std::iter::from_fn(|| q.pop().map(|(id, _)| id)).collect()
    }

    #[test]
    fn orders_by_priority_then_fifo() {
        let mut q = queue();
        q.put(1, Priority::Low, 0.0, ());
        q.put(2, Priority::Normal, 0.0, ());
        q.put(3, Priority::High, 0.0, ());
        q.put(4, Priority::Normal, 0.0, ());
        q.put(5, Priority::High, 0.0, ());
        assert_eq!(q.len(), 5);
        assert_eq!(q.len_per_priority(), [2, 2, 1]);
        assert_eq!(q.peek().map(|(id, _, _)| id), Some(3));
        assert_eq!(drain(&mut q), vec![3, 5, 2, 4, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn aging_crosses_levels_at_the_documented_times() {
        // A LOW request that waited 10.5 s longer beats a fresh NORMAL one...
        let mut q = queue();
        q.put(1, Priority::Normal, 10.5, ());
        q.put(2, Priority::Low, 0.0, ());
        assert_eq!(drain(&mut q), vec![2, 1]);
        // ...but not one that is only 9.5 s younger.
        q.put(1, Priority::Normal, 9.5, ());
        q.put(2, Priority::Low, 0.0, ());
        assert_eq!(drain(&mut q), vec![1, 2]);
        // A LOW request that waited 20.5 s longer beats a fresh HIGH one.
        q.put(1, Priority::High, 20.5, ());
        q.put(2, Priority::Low, 0.0, ());
        assert_eq!(drain(&mut q), vec![2, 1]);
        q.put(1, Priority::High, 19.5, ());
        q.put(2, Priority::Low, 0.0, ());
        assert_eq!(drain(&mut q), vec![1, 2]);
    }

    #[test]
    fn effective_priority_follows_the_formula() {
        let mut q = queue();
        q.put(7, Priority::Low, 3.0, ());
        let p = q.effective_priority(7, 13.0).unwrap();
        assert!((p - 1.0).abs() < 1e-12, "{p}");
        assert_eq!(q.effective_priority(8, 13.0), None);
    }

    #[test]
    fn remove_by_id_takes_any_element() {
        let mut q = queue();
        for id in 0..6 {
            q.put(id, Priority::Normal, id as f64, ());
        }
        assert_eq!(q.remove(3), Some(()));
        assert_eq!(q.remove(3), None);
        assert!(!q.contains(3));
        assert_eq!(q.remove(0), Some(()));
        assert_eq!(drain(&mut q), vec![1, 2, 4, 5]);
        assert_eq!(q.len_per_priority(), [0, 0, 0]);
    }

    #[test]
    fn full_queue_displaces_only_a_strictly_less_urgent_request() {
        let mut q = AgingQueue::new(DEFAULT_AGING_RATE, Some(2));
        assert_eq!(q.put(1, Priority::Normal, 0.0, "a"), PutOutcome::Queued);
        assert_eq!(q.put(2, Priority::Low, 0.0, "b"), PutOutcome::Queued);
        // Equal to the least urgent one: refused.
        assert_eq!(q.put(3, Priority::Low, 0.0, "c"), PutOutcome::Refused("c"));
        // A later LOW is even less urgent: refused.
        assert_eq!(q.put(4, Priority::Low, 1.0, "d"), PutOutcome::Refused("d"));
        // A HIGH displaces the LOW one.
        assert_eq!(
            q.put(5, Priority::High, 1.0, "e"),
            PutOutcome::Displaced(2, "b")
        );
        assert_eq!(q.len(), 2);
        // A NORMAL that arrives 1 s later is less urgent than the waiting NORMAL: refused.
        assert_eq!(
            q.put(6, Priority::Normal, 1.0, "f"),
            PutOutcome::Refused("f")
        );
        // A LOW that aged past NORMAL is protected: a fresh NORMAL cannot displace it.
        let mut q = AgingQueue::new(DEFAULT_AGING_RATE, Some(1));
        q.put(1, Priority::Low, 0.0, "old low");
        assert_eq!(
            q.put(2, Priority::Normal, 15.0, "x"),
            PutOutcome::Refused("x")
        );
        assert_eq!(
            q.put(3, Priority::High, 5.0, "y"),
            PutOutcome::Displaced(1, "old low")
        );
    }

    #[test]
    fn requeue_ignores_capacity_and_keeps_arrival() {
        let mut q = AgingQueue::new(DEFAULT_AGING_RATE, Some(1));
        q.put(1, Priority::Normal, 5.0, ());
        q.requeue(2, Priority::Normal, 1.0, ());
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), vec![2, 1]);
    }

    /// The reference: recompute every effective priority on each pop.
    fn naive_pop(
        items: &mut Vec<(RequestId, Priority, f64, u64)>,
        now: f64,
        rate: f64,
    ) -> Option<RequestId> {
        let best = (0..items.len()).min_by(|&a, &b| {
            let (_, pa, ta, sa) = items[a];
            let (_, pb, tb, sb) = items[b];
            let ea = effective_priority(pa, ta, now, rate);
            let eb = effective_priority(pb, tb, now, rate);
            // Compare at a resolution coarser than float noise, then FIFO.
            let (qa, qb) = ((ea * 1e9).round(), (eb * 1e9).round());
            qa.total_cmp(&qb).then(ta.total_cmp(&tb)).then(sa.cmp(&sb))
        })?;
        Some(items.remove(best).0)
    }

    proptest! {
        #[test]
        fn agrees_with_a_naive_reference(
            ops in proptest::collection::vec((0u8..3, 0u32..400, any::<bool>(), 0u8..4), 1..200)
        ) {
            let rate = DEFAULT_AGING_RATE;
            let mut q = AgingQueue::new(rate, None);
            let mut naive: Vec<(RequestId, Priority, f64, u64)> = Vec::new();
            let mut now = 0.0;
            let mut next_id = 0;
            for (prio, dt, pop, remove_hint) in ops {
                now += f64::from(dt) / 20.0; // 0.05 s steps so that ties happen
                if pop {
                    let got = q.pop().map(|(id, _)| id);
                    prop_assert_eq!(got, naive_pop(&mut naive, now, rate));
                } else if remove_hint == 0 && !naive.is_empty() {
                    let idx = (next_id as usize) % naive.len();
                    let id = naive.remove(idx).0;
                    prop_assert_eq!(q.remove(id), Some(()));
                } else {
                    let p = Priority::from_value(i64::from(prio)).unwrap();
                    q.put(next_id, p, now, ());
                    naive.push((next_id, p, now, next_id));
                    next_id += 1;
                }
                prop_assert_eq!(q.len(), naive.len());
            }
            while let Some((id, _)) = q.pop() {
                prop_assert_eq!(Some(id), naive_pop(&mut naive, now, rate));
            }
        }
    }
}
