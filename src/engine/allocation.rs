//! Which parts of a device hold data: the question backup tools ask (NBD's `base:allocation`,
//! `thinblk ls`) so that holes are neither read nor copied.

/// How a run of a device's bytes is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Backed by storage (or the device cannot tell): it must be read.
    Data,
    /// Nothing stores it and it reads as zeros (an unmapped thin block, a file's hole).
    Hole,
}

/// `len` consecutive bytes with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocationRun {
    pub len: u64,
    pub state: Allocation,
}

/// Appends a run, merging it into the last one when the state is the same.
pub fn push_run(runs: &mut Vec<AllocationRun>, len: u64, state: Allocation) {
    if len == 0 {
        return;
    }
    match runs.last_mut() {
        Some(last) if last.state == state => last.len += len,
        _ => runs.push(AllocationRun { len, state }),
    }
}

/// The most a device is asked to describe in one call: an answer may be shorter than the
/// range asked for (the caller asks again from where it ends), so one query of a huge range
/// never walks a whole device's mappings at once.
pub const MAX_QUERY_BYTES: u64 = 1 << 36;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_state_merge_and_empty_runs_vanish() {
        let mut runs = Vec::new();
        push_run(&mut runs, 10, Allocation::Hole);
        push_run(&mut runs, 0, Allocation::Data);
        push_run(&mut runs, 5, Allocation::Hole);
        push_run(&mut runs, 7, Allocation::Data);
        assert_eq!(
            runs,
            vec![
                AllocationRun {
                    len: 15,
                    state: Allocation::Hole
                },
                AllocationRun {
                    len: 7,
                    state: Allocation::Data
                }
            ]
        );
    }
}
