//! Shared helpers for the whole-system tests in this directory.
