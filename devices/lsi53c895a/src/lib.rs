//! lsi53c895a
