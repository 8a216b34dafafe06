//! What the relay's tasks tell a lane loop: wake up (a NOTIFY named the lane), and which sequence
//! range to claim. Each lane claims from a remembered cursor up to the highest sequence the NOTIFYs
//! have announced so far; a row that committed late below the cursor rewinds it. See
//! ARCHITECTURE.md, "The claim cursor", for why the upper bound keeps key order.

use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Rewinding to this makes the lane's next claim a full one: from the lane's start, no upper bound.
pub(crate) const FROM_START: i64 = i64::MIN;
/// No rewind pending.
const NONE: i64 = i64::MAX;

struct Lane {
    wake: watch::Sender<u64>,
    /// The lane loop's cursor as of its last claim (`FROM_START` when no loop runs it), for the
    /// sweep.
    cursor: AtomicI64,
}

/// The claim bounds, changed and read under one lock: a NOTIFY lowers its lanes' rewinds and
/// raises the announced bound in one step, and a claim reads the bound and takes its rewind in
/// one step, so a claim never takes a rewind newer than the bound it read (whose row the bound
/// might not cover: taken, it would be lost from the slot).
struct Bounds {
    /// The highest sequence of a row announced by a NOTIFY processed so far.
    announced: i64,
    /// Per lane, the lowest sequence the lane must claim from next, if lower than its cursor.
    rewinds: Vec<i64>,
    /// Per lane, a bound of its own: the lane's highest sequence when it last read from its start.
    floors: Vec<i64>,
}

/// The sequences one claim covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimRange {
    /// The lowest sequence (the cursor, or a late row's).
    pub(crate) from: i64,
    /// The highest sequence announced so far (`i64::MAX` for a full claim).
    pub(crate) to: i64,
}

impl ClaimRange {
    /// From the lane's start, no upper bound: what a lane without a cursor reads.
    pub(crate) const FULL: ClaimRange = ClaimRange { from: FROM_START, to: i64::MAX };

    #[cfg(test)]
    pub(crate) fn is_full(&self) -> bool {
        *self == Self::FULL
    }
}

/// One entry per lane: a wake-up channel and the lane's claim position; and the claim bounds. A
/// lane marks its channel seen *before* it claims, so a NOTIFY that lands between an empty claim
/// and the wait is not lost.
#[derive(Clone)]
pub(crate) struct LaneSignals {
    lanes: Arc<Vec<Lane>>,
    bounds: Arc<Mutex<Bounds>>,
}

impl LaneSignals {
    pub(crate) fn new(lanes: u16) -> Self {
        Self {
            lanes: Arc::new(
                (0..lanes).map(|_| Lane { wake: watch::channel(0u64).0, cursor: AtomicI64::new(FROM_START) }).collect(),
            ),
            bounds: Arc::new(Mutex::new(Bounds {
                announced: FROM_START,
                rewinds: vec![NONE; lanes as usize],
                floors: vec![FROM_START; lanes as usize],
            })),
        }
    }

    fn bounds(&self) -> std::sync::MutexGuard<'_, Bounds> {
        self.bounds.lock().expect("claim bounds lock")
    }

    /// The receiver a lane loop waits on.
    pub(crate) fn subscribe(&self, lane: i16) -> watch::Receiver<u64> {
        self.lanes[lane as usize].wake.subscribe()
    }

    /// What the lane's next claim covers: from its cursor (or lower, when a late row was
    /// announced) up to the highest announced sequence; everything when `full` is asked or a
    /// full claim is pending. The bound and the rewind are read together: a NOTIFY lowers rewinds
    /// and raises the bound in one step, so a bound that covers a row comes with the rewinds of
    /// every row committed before it, and every rewind taken lies within the bound. A rewind above
    /// the bound (the sweep's, which raises no bound) is left for a claim whose bound covers it.
    pub(crate) fn claim_range(&self, lane: i16, cursor: i64, full: bool) -> ClaimRange {
        let mut b = self.bounds();
        let to = b.announced.max(b.floors[lane as usize]);
        let slot = &mut b.rewinds[lane as usize];
        let rewind = *slot;
        if full || rewind == FROM_START || cursor == FROM_START {
            *slot = NONE;
            ClaimRange::FULL
        } else if rewind <= to {
            *slot = NONE;
            ClaimRange { from: rewind.min(cursor), to }
        } else {
            ClaimRange { from: cursor, to }
        }
    }

    /// After a claim from the lane's start: the lane's highest sequence in that claim's snapshot.
    /// The lane may claim up to it without a NOTIFY (a relay started on a backlog, rows written
    /// with triggers disabled): a row of the lane below it that was not visible then committed
    /// after, and an earlier row of its key committed before it took its number, so before that
    /// snapshot, and was read from the start. The other lanes' bounds are not raised: they did
    /// not read from their start.
    pub(crate) fn raise_lane_bound(&self, lane: i16, top: i64) {
        let mut b = self.bounds();
        let floor = &mut b.floors[lane as usize];
        *floor = (*floor).max(top);
    }

    /// Publishes the lane's cursor for the sweep (`FROM_START` when the loop ends).
    pub(crate) fn publish_cursor(&self, lane: i16, cursor: i64) {
        self.lanes[lane as usize].cursor.store(cursor, SeqCst);
    }

    /// The lanes whose loop has a cursor past the start, with it.
    pub(crate) fn cursors(&self) -> Vec<(i16, i64)> {
        self.lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let c = l.cursor.load(SeqCst);
                (c != FROM_START).then_some((i as i16, c))
            })
            .collect()
    }

    /// A claimable row of `lane` with sequence `seq` may sit below the lane's cursor: rewind the
    /// cursor to it, and wake the lane. Raises no upper bound.
    pub(crate) fn rewind(&self, lane: usize, seq: i64) {
        let Some(l) = self.lanes.get(lane) else { return };
        {
            let mut b = self.bounds();
            b.rewinds[lane] = b.rewinds[lane].min(seq);
        }
        l.wake.send_modify(|v| *v += 1);
    }

    /// Rows may be anywhere in any lane (the LISTEN session was away, or a payload said nothing
    /// usable): every lane's next claim is a full one.
    pub(crate) fn announce_all(&self) {
        self.bounds().rewinds.fill(FROM_START);
        for l in self.lanes.iter() {
            l.wake.send_modify(|v| *v += 1);
        }
    }

    /// Handles a NOTIFY payload: `lane:first:last` per lane a statement wrote to (`3:1041:1050`),
    /// the lowest and highest sequence it wrote there. Lanes are rewound first, then the upper
    /// bound raised. A lane without sequences (`3`, a trigger of schema 6) gets a full claim; an
    /// empty or unreadable payload (more lanes than fit) gives every lane one.
    pub(crate) fn announce_payload(&self, payload: &str) {
        let parsed: Option<Vec<(usize, i64, i64)>> = payload
            .split(',')
            .map(|item| {
                let mut parts = item.trim().split(':');
                let lane = parts.next()?.parse::<usize>().ok().filter(|l| *l < self.lanes.len())?;
                let first = match parts.next() {
                    Some(f) => f.parse::<i64>().ok()?,
                    None => FROM_START,
                };
                let last = match parts.next() {
                    Some(l) => l.parse::<i64>().ok()?,
                    None => first,
                };
                Some((lane, first, last))
            })
            .collect();
        match parsed {
            Some(items) if !payload.is_empty() => {
                {
                    let mut b = self.bounds();
                    for (lane, first, _) in &items {
                        b.rewinds[*lane] = b.rewinds[*lane].min(*first);
                    }
                    if let Some(last) = items.iter().map(|(_, _, last)| *last).max() {
                        b.announced = b.announced.max(last);
                    }
                }
                for (lane, _, _) in items {
                    self.lanes[lane].wake.send_modify(|v| *v += 1);
                }
            }
            _ => self.announce_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: i64, to: i64) -> ClaimRange {
        ClaimRange { from, to }
    }

    #[test]
    fn a_lane_without_a_cursor_claims_everything() {
        let s = LaneSignals::new(2);
        assert!(s.claim_range(0, FROM_START, false).is_full());
        assert!(s.claim_range(0, 100, true).is_full(), "a full claim when asked");
    }

    #[test]
    fn claims_stop_at_the_highest_announced_sequence() {
        let s = LaneSignals::new(4);
        s.announce_payload("1:120:130,2:125:140");
        assert_eq!(s.claim_range(1, 100, false), range(100, 140));
        s.announce_payload("3:141:141");
        assert_eq!(s.claim_range(1, 131, false), range(131, 141));
    }

    #[test]
    fn a_late_row_rewinds_only_its_lane_and_only_once() {
        let s = LaneSignals::new(4);
        s.announce_payload("1:40:40,2:900:910");
        assert_eq!(s.claim_range(1, 100, false), range(40, 910));
        assert_eq!(s.claim_range(1, 100, false), range(100, 910), "a rewind is taken once");
        assert_eq!(s.claim_range(2, 100, false), range(100, 910), "a row ahead of the cursor needs no rewind");
        assert_eq!(s.claim_range(0, 100, false), range(100, 910));
    }

    #[test]
    fn the_lowest_announcement_wins_until_taken() {
        let s = LaneSignals::new(2);
        s.announce_payload("0:50:60");
        s.announce_payload("0:30:35");
        s.rewind(0, 70);
        assert_eq!(s.claim_range(0, 100, false), range(30, 60));
    }

    #[test]
    fn a_rewind_above_the_bound_waits_for_a_bound_that_covers_it() {
        let s = LaneSignals::new(2);
        s.announce_payload("1:90:90");
        s.rewind(0, 120);
        assert_eq!(s.claim_range(0, 130, false), range(130, 90), "not taken while the bound is below it");
        s.announce_payload("1:140:140");
        assert_eq!(s.claim_range(0, 130, false), range(120, 140));
        assert_eq!(s.claim_range(0, 130, false), range(130, 140), "taken once");
    }

    #[test]
    fn a_lane_read_from_its_start_claims_up_to_its_top_without_a_notify() {
        let s = LaneSignals::new(2);
        s.announce_payload("1:50:60");
        s.raise_lane_bound(0, 5_000);
        assert_eq!(s.claim_range(0, 1_001, false), range(1_001, 5_000));
        assert_eq!(s.claim_range(1, 61, false), range(50, 60), "another lane keeps the announced bound");
        s.raise_lane_bound(0, 10);
        assert_eq!(s.claim_range(0, 1_001, false), range(1_001, 5_000), "a bound is never lowered");
    }

    #[test]
    fn old_or_unreadable_payloads_give_full_claims() {
        let s = LaneSignals::new(3);
        s.announce_payload("1");
        assert!(s.claim_range(1, 100, false).is_full());
        assert!(!s.claim_range(0, 100, false).is_full());
        s.announce_payload("");
        for lane in 0..3 {
            assert!(s.claim_range(lane, 100, false).is_full());
        }
        s.announce_payload("1:x");
        assert!(s.claim_range(2, 100, false).is_full());
        s.announce_payload("9:5:5");
        assert!(s.claim_range(0, 100, false).is_full(), "a lane this relay does not know announces all");
    }

    #[test]
    fn the_sweep_sees_only_running_lanes() {
        let s = LaneSignals::new(3);
        s.publish_cursor(1, 500);
        assert_eq!(s.cursors(), vec![(1, 500)]);
        s.publish_cursor(1, FROM_START);
        assert!(s.cursors().is_empty());
    }
}
