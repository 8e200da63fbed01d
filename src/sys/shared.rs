//! Counters in a shared mapping: the mapping seen as atomic words, and
//! counter blocks placed in it.
//!
//! A stats file is nothing but `AtomicU64` words: a header, listener
//! names and the counter blocks. Every access, by the workers that write
//! it and by `spliced stats` in another process that maps it read-only, is
//! an atomic load or store of one aligned word, so no access is a data race
//! and no bit pattern is invalid.

use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use memmap2::MmapRaw;

const WORD: usize = std::mem::size_of::<AtomicU64>();

/// Types that are a `repr(C)` sequence of `AtomicU64`s (fields or arrays of
/// them) and nothing else, so any run of words in a mapping is one.
///
/// Only [`word_block!`] implements it: a type is `Words` because the macro
/// declared it, never because its owner says so.
///
/// # Safety
/// An implementor must be `repr(C)`, contain only `AtomicU64` (directly or
/// in arrays), and so have no padding and an alignment of 8.
pub(crate) unsafe trait Words: Sync {}

/// The field types a [`word_block!`] admits: an `AtomicU64` or an array of
/// them. Sealed: nothing outside this module can add a type.
pub(crate) trait Word: sealed::Sealed {}

mod sealed {
    use std::sync::atomic::AtomicU64;

    pub trait Sealed {}
    impl Sealed for AtomicU64 {}
    impl<const N: usize> Sealed for [AtomicU64; N] {}
}

impl Word for AtomicU64 {}
impl<const N: usize> Word for [AtomicU64; N] {}

/// Compiles only for a [`Word`] type; [`word_block!`] calls it per field.
pub(crate) const fn is_word<T: Word>() {}

/// Compiles only for a type of whole, 8-aligned words; [`word_block!`]
/// checks each block it declares.
pub(crate) const fn whole_words<T>() {
    assert!(std::mem::size_of::<T>() % WORD == 0);
    assert!(std::mem::align_of::<T>() == WORD);
}

/// Declares a block of counter words that may live in a shared mapping:
/// a `repr(C)` struct (with `Debug` and `Default`) whose every field is an
/// `AtomicU64` or an array of them, and its [`Words`] impl.
///
/// The soundness argument lives here, not with the caller: the grammar
/// takes no attribute but doc comments (no other `repr`, no alignment) and
/// no generics, and every field type must be a sealed [`Word`], so whatever
/// a caller declares is plain words. The counter tables (`stats.rs`) and the
/// stats file's server head (`shm/servers.rs`) are declared with it.
macro_rules! word_block {
    (
        $(#[doc = $doc:literal])*
        $vis:vis struct $name:ident {
            $($(#[doc = $field_doc:literal])* $field_vis:vis $field:ident: $ty:ty,)+
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Default)]
        #[repr(C)]
        $vis struct $name {
            $($(#[doc = $field_doc])* $field_vis $field: $ty,)+
        }

        const _: () = {
            $($crate::sys::shared::is_word::<$ty>();)+
            $crate::sys::shared::whole_words::<$name>();
        };

        // SAFETY: the struct above is `repr(C)`, takes no other attribute
        // that could change its layout, and every field is an `AtomicU64`
        // or an array of them (each checked to be a sealed `Word` above), so
        // it is words and nothing else: no padding, an alignment of 8.
        #[allow(unsafe_code)]
        unsafe impl $crate::sys::shared::Words for $name {}
    };
}
pub(crate) use word_block;

/// The words of a mapping. The mapping must start on a page boundary
/// (every mmap does) and its length is rounded down to whole words.
///
/// Mapped read-only, the words may only be loaded: a store would fault.
pub(crate) fn words(map: &MmapRaw) -> &[AtomicU64] {
    let ptr = map.as_ptr();
    assert_eq!(ptr as usize % WORD, 0, "a mapping starts on a page");
    // SAFETY: the mapping is `map.len()` bytes of live memory for as long as
    // `map` is borrowed; the pointer is aligned for AtomicU64 (checked);
    // every bit pattern is a valid AtomicU64; and AtomicU64 has interior
    // mutability, so other writers (this process's workers through
    // `Placed`, or another process through its own mapping) never make this
    // shared slice unsound. Atomic loads of word size from read-only memory
    // are allowed on the platforms spliced runs on (see std::sync::atomic,
    // "Atomic accesses to read-only memory").
    unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), map.len() / WORD) }
}

/// The `T` at the start of `words`. Panics when it does not fit.
pub(crate) fn view<T: Words>(words: &[AtomicU64]) -> &T {
    assert!(
        std::mem::size_of::<T>() <= std::mem::size_of_val(words),
        "counter block past the mapping"
    );
    // SAFETY: `words` holds at least `size_of::<T>()` bytes of AtomicU64s,
    // aligned to 8, for the lifetime of the borrow; `T: Words` is such words
    // and nothing else, so the reference is valid and every access atomic.
    unsafe { &*words.as_ptr().cast::<T>() }
}

/// A `T` living at a fixed place in a shared mapping, keeping the mapping
/// alive: the counter block a worker writes directly into the stats file.
pub(crate) struct Placed<T: Words> {
    map: Arc<MmapRaw>,
    ptr: NonNull<T>,
    _t: PhantomData<T>,
}

impl<T: Words> Placed<T> {
    /// The `T` that starts at word `at` of `map`, which must be writable.
    /// Panics when it does not fit.
    pub(crate) fn new(map: &Arc<MmapRaw>, at: usize) -> Placed<T> {
        let words = words(map);
        let need = std::mem::size_of::<T>() / WORD;
        assert!(at + need <= words.len(), "counter block past the mapping");
        Placed {
            map: Arc::clone(map),
            ptr: NonNull::from(&words[at]).cast::<T>(),
            _t: PhantomData,
        }
    }
}

impl<T: Words> Clone for Placed<T> {
    fn clone(&self) -> Self {
        Placed {
            map: Arc::clone(&self.map),
            ptr: self.ptr,
            _t: PhantomData,
        }
    }
}

impl<T: Words> Deref for Placed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` points at `size_of::<T>()` bytes inside the mapping
        // (checked in `new`), aligned to 8 (word-aligned in a page-aligned
        // mapping), which `self.map` keeps alive; `T: Words` makes any
        // content a valid `T` whose every access is atomic.
        unsafe { self.ptr.as_ref() }
    }
}

// SAFETY: a `Placed<T>` is a shared reference to a `T: Sync` plus an `Arc`
// of the mapping; sending or sharing it is sending or sharing `&T`.
unsafe impl<T: Words> Send for Placed<T> {}
// SAFETY: as above.
unsafe impl<T: Words> Sync for Placed<T> {}

impl<T: Words + std::fmt::Debug> std::fmt::Debug for Placed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    word_block! {
        /// A block as the counter tables declare them.
        struct TestBlock {
            first: AtomicU64,
            spread: [AtomicU64; 3],
            last: AtomicU64,
        }
    }

    #[test]
    fn a_placed_block_writes_the_mapping_words() {
        let map: MmapRaw = memmap2::MmapMut::map_anon(4096).unwrap().into();
        let map = Arc::new(map);
        let block: Placed<TestBlock> = Placed::new(&map, 3);
        block.last.store(7, Relaxed);
        block.spread[1].store(5, Relaxed);
        let at = 3 + std::mem::offset_of!(TestBlock, last) / WORD;
        assert_eq!(at, 3 + 4);
        assert_eq!(words(&map)[at].load(Relaxed), 7);
        assert_eq!(words(&map)[3 + 2].load(Relaxed), 5);
    }

    #[test]
    #[should_panic(expected = "past the mapping")]
    fn a_block_must_fit() {
        let map = Arc::new(MmapRaw::from(memmap2::MmapMut::map_anon(64).unwrap()));
        let _ = Placed::<TestBlock>::new(&map, 7);
    }
}
