//! On-disk metadata of a HAST provider (pure: no I/O).
//!
//! Layout of a provider (see `docs/format.md`):
//!
//! ```text
//! [0, 4096)                 metadata block (this module)
//! [mapoff, mapoff+mapsize)  activemap bitmap, 1 bit per extent, LSB first
//! [datamapoff, +mapsize)    written map (format 2): extents written since
//!                           `hastctl create`, 1 bit per extent
//! [localoff, +datasize)     data area, exported as the device
//! ```
//!
//! Every integer is little-endian; the block carries a magic, a format
//! version and a crc32c so that a foreign or damaged block is reported,
//! never silently reinterpreted.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the metadata block at offset 0 of every provider.
pub const METADATA_SIZE: usize = 4096;
/// Magic at offset 0 of the metadata block.
pub const MAGIC: [u8; 8] = *b"HASTRSMD";
/// Current metadata format version: 2 added the written map
/// (`datamapoff`). Version 1 providers are still read (without a written
/// map: every extent counts as written).
pub const FORMAT_VERSION: u32 = 2;
/// The first format version, still read.
pub const FORMAT_VERSION_1: u32 = 1;
/// Longest resource name stored in the metadata block (bytes, UTF-8).
pub const MAX_NAME_LEN: usize = 127;
/// Default extent size (`hastctl create -e`).
pub const DEFAULT_EXTENT_SIZE: u32 = 2 * 1024 * 1024;
/// Default number of extents kept dirty (`hastctl create -k`): 1,024 × the
/// default 2 MiB extent = a 2 GiB hot set, of the order of DRBD's default
/// activity log (1,237 × 4 MiB). The original's 64 (128 MiB) makes random
/// writes over any larger working set wait for a metadata write and flush
/// nearly every time; the price of the larger set is what a crash of the
/// primary resynchronises (at most the hot set plus what is held for the
/// secondary's flush). `-k 64` gives the original's value. See
/// docs/hast.conf.md ("keepdirty").
pub const DEFAULT_KEEPDIRTY: u32 = 1024;
/// Data area alignment: the data area starts on a 4 KiB boundary so that
/// 4 KiB requests from clients map to 4 KiB-aligned provider I/O.
pub const DATA_ALIGN: u64 = 4096;

/// Metadata flag: this node's data is the target of an unfinished
/// synchronisation (some extents are older than the peer's): it must not
/// be promoted without knowing it.
pub const FLAG_INCONSISTENT: u64 = 1;

/// Metadata flag: the operator chose to discard this node's changes since
/// a split-brain (`hastctl split-brain discard`): at the next handshake it
/// accepts the peer's data over the extents either side changed.
pub const FLAG_DISCARD: u64 = 2;

/// Role a node last held for a resource, stored as `prevrole`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No I/O; the resource is configured but not active.
    Init,
    /// Receives the primary's writes.
    Secondary,
    /// Exposes the device and replicates its writes.
    Primary,
}

impl Role {
    /// Stable on-disk code of the role.
    pub const fn code(self) -> u8 {
        match self {
            Role::Init => 0,
            Role::Secondary => 1,
            Role::Primary => 2,
        }
    }

    /// Role from its on-disk code.
    pub const fn from_code(code: u8) -> Option<Role> {
        match code {
            0 => Some(Role::Init),
            1 => Some(Role::Secondary),
            2 => Some(Role::Primary),
            _ => None,
        }
    }

    /// The lowercase name used by hastctl and hooks.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Init => "init",
            Role::Secondary => "secondary",
            Role::Primary => "primary",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "init" => Ok(Role::Init),
            "secondary" => Ok(Role::Secondary),
            "primary" => Ok(Role::Primary),
            other => Err(format!(
                "unknown role '{other}' (expected init, primary or secondary)"
            )),
        }
    }
}

/// The raw metadata block exactly as stored on disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone)]
#[repr(C)]
pub struct RawMetadata {
    magic: [u8; 8],
    version: U32,
    crc: U32,
    name: [u8; 128],
    datasize: U64,
    extentsize: U32,
    keepdirty: U32,
    localoff: U64,
    mapoff: U64,
    mapsize: U64,
    sectorsize: U32,
    prevrole: u8,
    _pad: [u8; 3],
    resuid: U64,
    localcnt: U64,
    remotecnt: U64,
    flags: U64,
    datamapoff: U64,
    _reserved: [u8; 3864],
}

const _: () = assert!(core::mem::size_of::<RawMetadata>() == METADATA_SIZE);
/// Offset of the crc32c field, zeroed while computing the checksum.
const CRC_OFFSET: usize = 12;

/// Decoded, validated metadata of one provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Metadata {
    /// Resource name the provider belongs to.
    pub resource: String,
    /// Size of the data area (the exported device), bytes.
    pub datasize: u64,
    /// Bytes covered by one activemap bit.
    pub extentsize: u32,
    /// Extents kept marked on disk while idle.
    pub keepdirty: u32,
    /// Offset of the data area.
    pub localoff: u64,
    /// Offset of the activemap bitmap.
    pub mapoff: u64,
    /// Bytes reserved for the bitmap (a multiple of `sectorsize`).
    pub mapsize: u64,
    /// Logical sector size of the provider at creation.
    pub sectorsize: u32,
    /// Random resource identifier, 0 until the resource is first used.
    pub resuid: u64,
    /// Generation counter of this node's data.
    pub localcnt: u64,
    /// Last known generation counter of the peer's data.
    pub remotecnt: u64,
    /// Role held when the metadata was last written.
    pub prevrole: Role,
    /// Flag bits ([`FLAG_INCONSISTENT`]).
    pub flags: u64,
    /// Offset of the written map (`mapsize` bytes, one bit per extent: set
    /// once the extent was written since `hastctl create`); 0 for a
    /// format 1 provider, which has none.
    pub datamapoff: u64,
}

/// Why a metadata block could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The block does not start with our magic: not a HAST provider (or one
    /// written by another implementation).
    #[error("no HAST metadata found (magic {found:02x?}); initialise it with 'hastctl create'")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// Written by a newer (or unknown) format version.
    #[error("unsupported metadata format version {0} (this build reads versions {FORMAT_VERSION_1} and {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The checksum does not match: the block is damaged.
    #[error("metadata checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the metadata block is damaged")]
    Checksum {
        /// crc32c stored in the block.
        stored: u32,
        /// crc32c computed over the block.
        computed: u32,
    },
    /// The fields contradict each other or the provider.
    #[error("inconsistent metadata: {0}")]
    Inconsistent(String),
    /// Creation parameters that cannot work.
    #[error("{0}")]
    InvalidParameters(String),
}

/// Geometry computed when a provider is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Offset of the bitmap.
    pub mapoff: u64,
    /// Bytes reserved for the bitmap.
    pub mapsize: u64,
    /// Offset of the written map (as large as the activemap).
    pub datamapoff: u64,
    /// Offset of the data area.
    pub localoff: u64,
    /// Size of the data area.
    pub datasize: u64,
}

/// Rounds `v` up to a multiple of `align` (a power of two or any non-zero).
pub const fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Rounds `v` down to a multiple of `align`.
pub const fn round_down(v: u64, align: u64) -> u64 {
    v / align * align
}

/// Number of extents covering `datasize` bytes.
pub fn extent_count(datasize: u64, extentsize: u32) -> u64 {
    datasize.div_ceil(u64::from(extentsize))
}

/// Bytes of bitmap needed for `datasize`, rounded up to `sectorsize`.
pub fn bitmap_size(datasize: u64, extentsize: u32, sectorsize: u32) -> u64 {
    let bytes = extent_count(datasize, extentsize).div_ceil(8);
    round_up(bytes.max(1), u64::from(sectorsize))
}

/// Computes the layout of a provider of `mediasize` bytes.
pub fn compute_geometry(
    mediasize: u64,
    extentsize: u32,
    sectorsize: u32,
) -> Result<Geometry, MetadataError> {
    if sectorsize == 0 || !sectorsize.is_power_of_two() || sectorsize > 65536 {
        return Err(MetadataError::InvalidParameters(format!(
            "sector size {sectorsize} is not a power of two between 512 and 65536"
        )));
    }
    if extentsize == 0 || !extentsize.is_multiple_of(sectorsize) {
        return Err(MetadataError::InvalidParameters(format!(
            "extent size {extentsize} is not a multiple of the sector size {sectorsize}"
        )));
    }
    let align = DATA_ALIGN.max(u64::from(sectorsize));
    let mapoff = round_up(METADATA_SIZE as u64, u64::from(sectorsize));
    // Size the bitmap for the whole medium (slightly more than the data
    // area needs), then give the rest to the data area.
    let mapsize = bitmap_size(mediasize, extentsize, sectorsize);
    let datamapoff = mapoff + mapsize;
    let localoff = round_up(datamapoff + mapsize, align);
    if mediasize <= localoff {
        return Err(MetadataError::InvalidParameters(format!(
            "media size {mediasize} is too small: metadata and activemap need {localoff} bytes"
        )));
    }
    let datasize = round_down(mediasize - localoff, u64::from(sectorsize));
    if datasize == 0 {
        return Err(MetadataError::InvalidParameters(format!(
            "media size {mediasize} leaves no data area"
        )));
    }
    Ok(Geometry {
        mapoff,
        mapsize,
        datamapoff,
        localoff,
        datasize,
    })
}

impl Metadata {
    /// Fresh metadata for a newly created provider.
    pub fn new(
        resource: &str,
        mediasize: u64,
        extentsize: u32,
        keepdirty: u32,
        sectorsize: u32,
    ) -> Result<Metadata, MetadataError> {
        validate_name(resource)?;
        if keepdirty == 0 {
            return Err(MetadataError::InvalidParameters(
                "keepdirty must be at least 1".into(),
            ));
        }
        let g = compute_geometry(mediasize, extentsize, sectorsize)?;
        Ok(Metadata {
            resource: resource.to_owned(),
            datasize: g.datasize,
            extentsize,
            keepdirty,
            localoff: g.localoff,
            mapoff: g.mapoff,
            mapsize: g.mapsize,
            sectorsize,
            resuid: 0,
            localcnt: 0,
            remotecnt: 0,
            prevrole: Role::Init,
            flags: 0,
            datamapoff: g.datamapoff,
        })
    }

    /// Number of extents of the data area.
    pub fn extents(&self) -> u64 {
        extent_count(self.datasize, self.extentsize)
    }

    /// Encodes the block, checksum included.
    pub fn encode(&self) -> Box<[u8; METADATA_SIZE]> {
        let mut name = [0u8; 128];
        name[..self.resource.len()].copy_from_slice(self.resource.as_bytes());
        let raw = RawMetadata {
            magic: MAGIC,
            version: U32::new(if self.datamapoff == 0 {
                FORMAT_VERSION_1
            } else {
                FORMAT_VERSION
            }),
            crc: U32::new(0),
            name,
            datasize: U64::new(self.datasize),
            extentsize: U32::new(self.extentsize),
            keepdirty: U32::new(self.keepdirty),
            localoff: U64::new(self.localoff),
            mapoff: U64::new(self.mapoff),
            mapsize: U64::new(self.mapsize),
            sectorsize: U32::new(self.sectorsize),
            prevrole: self.prevrole.code(),
            _pad: [0; 3],
            resuid: U64::new(self.resuid),
            localcnt: U64::new(self.localcnt),
            remotecnt: U64::new(self.remotecnt),
            flags: U64::new(self.flags),
            datamapoff: U64::new(self.datamapoff),
            _reserved: [0; 3864],
        };
        let mut out = Box::new([0u8; METADATA_SIZE]);
        out.copy_from_slice(raw.as_bytes());
        let crc = checksum(&out[..]);
        out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates a block read from a provider of `mediasize`
    /// bytes.
    pub fn decode(block: &[u8], mediasize: u64) -> Result<Metadata, MetadataError> {
        let raw = RawMetadata::read_from_prefix(block)
            .map_err(|_| {
                MetadataError::Inconsistent(format!(
                    "metadata block is {} bytes, expected {METADATA_SIZE}",
                    block.len()
                ))
            })?
            .0;
        if raw.magic != MAGIC {
            return Err(MetadataError::BadMagic { found: raw.magic });
        }
        let version = raw.version.get();
        if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
            return Err(MetadataError::UnsupportedVersion(version));
        }
        let stored = raw.crc.get();
        let computed = checksum(&block[..METADATA_SIZE]);
        if stored != computed {
            return Err(MetadataError::Checksum { stored, computed });
        }
        let name_len = raw.name.iter().position(|&b| b == 0).unwrap_or(128);
        let resource = std::str::from_utf8(&raw.name[..name_len])
            .map_err(|_| MetadataError::Inconsistent("resource name is not UTF-8".into()))?
            .to_owned();
        let prevrole = Role::from_code(raw.prevrole).ok_or_else(|| {
            MetadataError::Inconsistent(format!("unknown prevrole code {}", raw.prevrole))
        })?;
        let md = Metadata {
            resource,
            datasize: raw.datasize.get(),
            extentsize: raw.extentsize.get(),
            keepdirty: raw.keepdirty.get(),
            localoff: raw.localoff.get(),
            mapoff: raw.mapoff.get(),
            mapsize: raw.mapsize.get(),
            sectorsize: raw.sectorsize.get(),
            resuid: raw.resuid.get(),
            localcnt: raw.localcnt.get(),
            remotecnt: raw.remotecnt.get(),
            prevrole,
            flags: raw.flags.get(),
            datamapoff: raw.datamapoff.get(),
        };
        match (version, md.datamapoff) {
            (FORMAT_VERSION_1, 0) => {}
            (FORMAT_VERSION_1, off) => {
                return Err(MetadataError::Inconsistent(format!(
                    "format 1 metadata with a written map offset {off}"
                )))
            }
            (_, 0) => {
                return Err(MetadataError::Inconsistent(
                    "format 2 metadata without a written map".into(),
                ))
            }
            _ => {}
        }
        md.check(mediasize)?;
        Ok(md)
    }

    /// Checks that the fields describe a usable layout on a provider of
    /// `mediasize` bytes.
    pub fn check(&self, mediasize: u64) -> Result<(), MetadataError> {
        let bad = |m: String| Err(MetadataError::Inconsistent(m));
        if self.sectorsize < 512 || !self.sectorsize.is_power_of_two() {
            return bad(format!("sector size {} is invalid", self.sectorsize));
        }
        if self.extentsize == 0 || !self.extentsize.is_multiple_of(self.sectorsize) {
            return bad(format!(
                "extent size {} is not a multiple of the sector size {}",
                self.extentsize, self.sectorsize
            ));
        }
        if self.keepdirty == 0 {
            return bad("keepdirty is 0".into());
        }
        if self.mapoff < METADATA_SIZE as u64
            || !self.mapoff.is_multiple_of(u64::from(self.sectorsize))
        {
            return bad(format!("activemap offset {} is invalid", self.mapoff));
        }
        let need = bitmap_size(self.datasize, self.extentsize, self.sectorsize);
        if self.mapsize < need || !self.mapsize.is_multiple_of(u64::from(self.sectorsize)) {
            return bad(format!(
                "activemap size {} cannot hold {} extents",
                self.mapsize,
                self.extents()
            ));
        }
        let maps_end = if self.datamapoff == 0 {
            self.mapoff + self.mapsize
        } else {
            if self.datamapoff < self.mapoff + self.mapsize
                || !self.datamapoff.is_multiple_of(u64::from(self.sectorsize))
            {
                return bad(format!(
                    "written map offset {} overlaps the activemap",
                    self.datamapoff
                ));
            }
            self.datamapoff + self.mapsize
        };
        if self.localoff < maps_end || !self.localoff.is_multiple_of(u64::from(self.sectorsize)) {
            return bad(format!(
                "data offset {} overlaps the activemap",
                self.localoff
            ));
        }
        if self.datasize == 0 || !self.datasize.is_multiple_of(u64::from(self.sectorsize)) {
            return bad(format!("data size {} is invalid", self.datasize));
        }
        match self.localoff.checked_add(self.datasize) {
            Some(end) if end <= mediasize => Ok(()),
            _ => bad(format!(
                "data area [{}, +{}) extends past the end of the provider ({} bytes)",
                self.localoff, self.datasize, mediasize
            )),
        }
    }
}

/// Checks a resource name for storage in the metadata block.
pub fn validate_name(name: &str) -> Result<(), MetadataError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(MetadataError::InvalidParameters(format!(
            "resource name '{name}' must be 1 to {MAX_NAME_LEN} bytes without NUL"
        )));
    }
    Ok(())
}

/// crc32c of a metadata block with its checksum field taken as zero.
fn checksum(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..CRC_OFFSET]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &block[CRC_OFFSET + 4..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Metadata {
        let mut md = Metadata::new("disk1", 1 << 30, DEFAULT_EXTENT_SIZE, 64, 512).unwrap();
        md.resuid = 0x1122_3344_5566_7788;
        md.localcnt = 3;
        md.remotecnt = 2;
        md.prevrole = Role::Primary;
        md
    }

    #[test]
    fn round_trip() {
        let md = sample();
        let block = md.encode();
        assert_eq!(Metadata::decode(&block[..], 1 << 30).unwrap(), md);
    }

    #[test]
    fn layout_is_little_endian_and_fixed() {
        let block = sample().encode();
        assert_eq!(&block[0..8], b"HASTRSMD");
        assert_eq!(&block[8..12], &2u32.to_le_bytes());
        assert_eq!(&block[224..232], &4608u64.to_le_bytes());
        assert_eq!(&block[16..21], b"disk1");
        assert_eq!(&block[152..156], &DEFAULT_EXTENT_SIZE.to_le_bytes());
        assert_eq!(&block[192..200], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(block[188], Role::Primary.code());
    }

    #[test]
    fn geometry_of_one_gib() {
        let md = Metadata::new("r", 1 << 30, DEFAULT_EXTENT_SIZE, 64, 512).unwrap();
        // 512 extents -> 64 bytes of bitmap -> one sector, twice.
        assert_eq!(md.mapoff, 4096);
        assert_eq!(md.mapsize, 512);
        assert_eq!(md.datamapoff, 4608);
        assert_eq!(md.localoff, 8192);
        assert_eq!(md.datasize, (1 << 30) - 8192);
        assert_eq!(md.extents(), 512);
    }

    #[test]
    fn foreign_block_is_rejected() {
        let zeros = [0u8; METADATA_SIZE];
        assert!(matches!(
            Metadata::decode(&zeros, 1 << 30),
            Err(MetadataError::BadMagic { .. })
        ));
    }

    #[test]
    fn corruption_is_detected() {
        let mut block = sample().encode();
        block[150] ^= 1;
        assert!(matches!(
            Metadata::decode(&block[..], 1 << 30),
            Err(MetadataError::Checksum { .. })
        ));
    }

    #[test]
    fn newer_version_is_refused() {
        let mut block = sample().encode();
        block[8] = 3;
        assert_eq!(
            Metadata::decode(&block[..], 1 << 30),
            Err(MetadataError::UnsupportedVersion(3))
        );
    }

    /// A format 1 block (no written map) is still read, and written back
    /// as format 1.
    #[test]
    fn format_1_is_still_read() {
        let mut md = sample();
        md.datamapoff = 0;
        let block = md.encode();
        assert_eq!(&block[8..12], &1u32.to_le_bytes());
        assert_eq!(Metadata::decode(&block[..], 1 << 30).unwrap(), md);
        // A format 1 block carrying a written map offset is damaged.
        let mut raw = block.clone();
        raw[224] = 1;
        let crc = checksum(&raw[..]);
        raw[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Metadata::decode(&raw[..], 1 << 30),
            Err(MetadataError::Inconsistent(_))
        ));
        // Format 2 without one too.
        let mut raw = sample().encode();
        raw[224..232].fill(0);
        let crc = checksum(&raw[..]);
        raw[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Metadata::decode(&raw[..], 1 << 30),
            Err(MetadataError::Inconsistent(_))
        ));
    }

    #[test]
    fn shrunken_provider_is_inconsistent() {
        let block = sample().encode();
        assert!(matches!(
            Metadata::decode(&block[..], 1 << 29),
            Err(MetadataError::Inconsistent(_))
        ));
    }

    #[test]
    fn bad_parameters() {
        assert!(Metadata::new("r", 1 << 20, 1000, 64, 512).is_err());
        assert!(Metadata::new("r", 8192, 4096, 64, 512).is_err());
        assert!(Metadata::new("", 1 << 20, 4096, 64, 512).is_err());
        assert!(Metadata::new("r", 1 << 20, 4096, 0, 512).is_err());
        assert!(Metadata::new(&"x".repeat(200), 1 << 20, 4096, 1, 512).is_err());
    }

    proptest! {
        #[test]
        fn geometry_is_consistent(
            mediasize in 16384u64..(1u64 << 44),
            extent_shift in 12u32..27,
            sector_shift in 9u32..13,
        ) {
            let extentsize = 1u32 << extent_shift;
            let sectorsize = 1u32 << sector_shift;
            prop_assume!(extentsize >= sectorsize);
            if let Ok(md) = Metadata::new("p", mediasize, extentsize, 64, sectorsize) {
                md.check(mediasize).unwrap();
                prop_assert_eq!(md.localoff % 4096, 0);
                prop_assert!(md.mapsize * 8 >= md.extents());
                let block = md.encode();
                prop_assert_eq!(Metadata::decode(&block[..], mediasize).unwrap(), md);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000), media in any::<u64>()) {
            let _ = Metadata::decode(&bytes, media);
        }
    }
}
