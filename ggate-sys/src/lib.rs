//! FreeBSD GEOM Gate bindings (placeholder while being written).
