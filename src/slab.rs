//! A slab: values stored by a small integer key (reused after removal), for
//! what is in flight on a ring and named by its user_data.

pub(crate) struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    pub(crate) fn insert(&mut self, v: T) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(v);
                i
            }
            None => {
                self.slots.push(Some(v));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub(crate) fn take(&mut self, key: u32) -> Option<T> {
        let v = self.slots.get_mut(key as usize).and_then(Option::take);
        if v.is_some() {
            self.free.push(key);
        }
        v
    }

    pub(crate) fn get_mut(&mut self, key: u32) -> Option<&mut T> {
        self.slots.get_mut(key as usize).and_then(Option::as_mut)
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn keys_are_reused_and_taken_once() {
        let mut s = Slab::default();
        let (a, b) = (s.insert('a'), s.insert('b'));
        assert_eq!(s.take(a), Some('a'));
        assert_eq!(s.take(a), None);
        assert_eq!(s.insert('c'), a);
        assert_eq!(s.get_mut(b).copied(), Some('b'));
        assert_eq!(s.take(99), None);
    }
}
