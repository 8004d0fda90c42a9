//! Files changing underneath a read: truncation mid-read never kills the process.
