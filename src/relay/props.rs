//! Property tests of the relay state machine (proptest).
