//! Entry points for fuzz targets (cargo-fuzz) and property tests: drives the
//! pure state machines with scripted engines. Not a stable API.
