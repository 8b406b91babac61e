//! HAST control plane.
