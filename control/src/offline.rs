//! Commands that work on the provider directly, without hastd:
//! `hastctl create` and `hastctl dump`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use hast_datapath::metadata::{Metadata, DEFAULT_EXTENT_SIZE, DEFAULT_KEEPDIRTY, METADATA_SIZE};
use hast_datapath::provider;

use crate::config::ResourceConfig;

/// Parameters of `hastctl create`; None means the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateParams {
    /// `-m`: bytes of the provider to use (default: all of it).
    pub mediasize: Option<u64>,
    /// `-e`: extent size (default 2 MiB).
    pub extentsize: Option<u64>,
    /// `-k`: keepdirty (default 64).
    pub keepdirty: Option<u64>,
    /// `-f`: overwrite a provider holding another resource's metadata.
    pub force: bool,
}

/// Writes fresh metadata and a zeroed activemap on the resource's
/// provider. Returns the metadata written.
///
/// Refused when a hastd (this node's or another's) uses the provider (its
/// exclusive claim, [`provider::ProviderLock`], is held for as long as it
/// writes), and when the provider holds the metadata of another resource
/// unless `params.force`.
pub fn create(res: &ResourceConfig, params: CreateParams) -> Result<Metadata, String> {
    let path = &res.localpath;
    let ctx = |e: String| format!("[{}] {}", res.name, e);
    let _claim = provider::ProviderLock::acquire(path).map_err(|e| {
        ctx(format!(
            "{e}; a provider cannot be initialised while a resource uses it (run 'hastctl role init' where it is active)"
        ))
    })?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| ctx(format!("{}: cannot open: {e}", path.display())))?;
    let info = provider::probe_file(path, &file).map_err(|e| ctx(e.to_string()))?;
    if !params.force {
        let mut block = vec![0u8; METADATA_SIZE];
        if file.read_exact_at(&mut block, 0).is_ok() {
            if let Ok(old) = Metadata::decode(&block, info.mediasize) {
                if old.resource != res.name {
                    return Err(ctx(format!(
                        "{} holds the metadata of resource '{}' (resuid {:#x}, generation {}): not overwriting it; check the 'local' of both resources in hast.conf, or use 'hastctl create -f' to destroy it",
                        path.display(),
                        old.resource,
                        old.resuid,
                        old.localcnt
                    )));
                }
            }
        }
    }
    let mediasize = match params.mediasize {
        None => info.mediasize,
        Some(m) if m > info.mediasize => {
            return Err(ctx(format!(
                "requested media size {m} is larger than provider {} ({} bytes)",
                path.display(),
                info.mediasize
            )))
        }
        Some(m) => m,
    };
    let extentsize = params.extentsize.unwrap_or(u64::from(DEFAULT_EXTENT_SIZE));
    if extentsize < u64::from(info.sectorsize) {
        return Err(ctx(format!(
            "extent size {extentsize} is less than the sector size {} of {}",
            info.sectorsize,
            path.display()
        )));
    }
    let extentsize = u32::try_from(extentsize).map_err(|_| {
        ctx(format!(
            "extent size {extentsize} is too large (at most 2 GiB)"
        ))
    })?;
    let keepdirty = params.keepdirty.unwrap_or(u64::from(DEFAULT_KEEPDIRTY));
    let keepdirty = u32::try_from(keepdirty)
        .ok()
        .filter(|&k| k > 0)
        .ok_or_else(|| {
            ctx(format!(
                "keepdirty {keepdirty} must be between 1 and {}",
                u32::MAX
            ))
        })?;
    let md = Metadata::new(&res.name, mediasize, extentsize, keepdirty, info.sectorsize)
        .map_err(|e| ctx(format!("{}: {e}", path.display())))?;
    let werr = |what: &str, e: std::io::Error| {
        ctx(format!("{}: cannot write {what}: {e}", path.display()))
    };
    // Bitmap first, then the metadata block: a crash in between leaves no
    // valid metadata, never valid metadata over a stale bitmap.
    let zeros = vec![0u8; md.mapsize as usize];
    file.write_all_at(&zeros, md.mapoff)
        .map_err(|e| werr("activemap", e))?;
    // Nothing written yet: a full synchronisation copies nothing until the
    // application writes.
    file.write_all_at(&zeros, md.datamapoff)
        .map_err(|e| werr("written map", e))?;
    file.sync_data().map_err(|e| werr("activemap", e))?;
    file.write_all_at(&md.encode()[..], 0)
        .map_err(|e| werr("metadata", e))?;
    file.sync_all().map_err(|e| werr("metadata", e))?;
    Ok(md)
}

/// What `hastctl dump` shows besides the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapCounts {
    /// Extents marked in the on-disk activemap.
    pub marked: u64,
    /// Extents written since `hastctl create` (None: a format 1 provider,
    /// without a written map).
    pub written: Option<u64>,
}

fn count_bits(map: &[u8], extents: u64) -> u64 {
    (0..extents)
        .filter(|&e| map[(e / 8) as usize] & (1 << (e % 8)) != 0)
        .count() as u64
}

/// Reads the metadata and counts the extents marked in the on-disk
/// activemap and written since create.
pub fn read(res: &ResourceConfig) -> Result<(Metadata, MapCounts), String> {
    let path = &res.localpath;
    let ctx = |e: String| format!("[{}] {}", res.name, e);
    let file =
        File::open(path).map_err(|e| ctx(format!("{}: cannot open: {e}", path.display())))?;
    let info = provider::probe_file(path, &file).map_err(|e| ctx(e.to_string()))?;
    let mut block = vec![0u8; METADATA_SIZE];
    file.read_exact_at(&mut block, 0)
        .map_err(|e| ctx(format!("{}: cannot read metadata: {e}", path.display())))?;
    let md = Metadata::decode(&block, info.mediasize)
        .map_err(|e| ctx(format!("{}: {e}", path.display())))?;
    if md.resource != res.name {
        return Err(ctx(format!(
            "{}: provider belongs to resource '{}'",
            path.display(),
            md.resource
        )));
    }
    let mut map = vec![0u8; md.mapsize as usize];
    file.read_exact_at(&mut map, md.mapoff)
        .map_err(|e| ctx(format!("{}: cannot read activemap: {e}", path.display())))?;
    let extents = md.extents();
    let marked = count_bits(&map, extents);
    let written = if md.datamapoff == 0 {
        None
    } else {
        file.read_exact_at(&mut map, md.datamapoff)
            .map_err(|e| ctx(format!("{}: cannot read written map: {e}", path.display())))?;
        Some(count_bits(&map, extents))
    };
    Ok((md, MapCounts { marked, written }))
}
