//! The recently-closed set of docs/protocol.md §9: the IDs of a circuit's
//! streams that ended, kept so that late cells for them are dropped
//! silently and the client does not reuse them early. Bounded: the oldest
//! entries go first.

use std::collections::{HashSet, VecDeque};

/// How many recently closed stream IDs a circuit remembers (R9.2).
pub const RECENTLY_CLOSED: usize = 4096;

/// Stream IDs that closed, at most `RECENTLY_CLOSED`, oldest first out.
#[derive(Debug, Default, Clone)]
pub struct RecentlyClosed {
    order: VecDeque<u16>,
    set: HashSet<u16>,
}

impl RecentlyClosed {
    /// Remembers `id` (R9.1); past the bound the oldest ID is forgotten
    /// (R9.2).
    pub fn insert(&mut self, id: u16) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > RECENTLY_CLOSED {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    /// Forgets `id`: a BEGIN opened a new stream on it (R5.14).
    pub fn remove(&mut self, id: u16) {
        if self.set.remove(&id) {
            self.order.retain(|&x| x != id);
        }
    }

    pub fn contains(&self, id: u16) -> bool {
        self.set.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // R9.1, R9.2: bounded, oldest first out.
    #[test]
    fn the_oldest_id_goes_first() {
        let mut r = RecentlyClosed::default();
        for id in 1..=RECENTLY_CLOSED as u16 + 1 {
            r.insert(id);
        }
        assert_eq!(r.len(), RECENTLY_CLOSED);
        assert!(!r.contains(1), "the oldest is forgotten");
        assert!(r.contains(2) && r.contains(RECENTLY_CLOSED as u16 + 1));
    }

    // R5.14: an ID a new stream took leaves the set; inserting twice keeps
    // one entry.
    #[test]
    fn remove_and_reinsert() {
        let mut r = RecentlyClosed::default();
        r.insert(7);
        r.insert(7);
        assert_eq!(r.len(), 1);
        r.remove(7);
        assert!(!r.contains(7) && r.is_empty());
    }
}
