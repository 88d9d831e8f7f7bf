//! Snapshots: the whole host in a versioned, checksummed binary file.
//!
//! Layout: magic `GMEMSNAP`, format version (u32 LE), payload length (u64 LE), CRC-32 of the
//! payload (u32 LE), payload (postcard encoding of the host). Written to a temporary file
//! in the same directory and renamed over the target, so a crash never leaves a torn file.
//! Loading checks magic, version, length and checksum, decodes, then runs every invariant
//! check: a file that fails any step loads nothing.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result, einval, err, errno};
use crate::guest_memfd::{UPTODATE, entry_frame};
use crate::host::Host;

const MAGIC: &[u8; 8] = b"GMEMSNAP";
/// Bumped whenever the encoded layout changes.
pub const FORMAT_VERSION: u32 = 14;
const HEADER: usize = 8 + 4 + 8 + 4;

impl Host {
    /// Encode the host as snapshot bytes.
    pub fn to_snapshot(&self) -> Result<Vec<u8>> {
        let payload = postcard::to_stdvec(self)
            .map_err(|e| einval(format!("snapshot encoding failed: {e}")))?;
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decode snapshot bytes, refusing anything truncated, corrupted, of another version or
    /// inconsistent.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(einval(
                "not a gmem snapshot (bad magic or truncated header)",
            ));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(einval(format!(
                "snapshot format version {version} is not supported (this gmem reads version {FORMAT_VERSION})"
            )));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != len {
            return Err(einval(format!(
                "snapshot truncated: payload {} of {len} bytes",
                payload.len()
            )));
        }
        if crc32fast::hash(payload) != crc {
            return Err(einval("snapshot corrupted: checksum mismatch"));
        }
        let host: Host = postcard::from_bytes(payload)
            .map_err(|e| einval(format!("snapshot payload invalid: {e}")))?;
        host.validate_shape()?;
        host.check().map_err(|e| match e {
            Error::Invariant(m) => einval(format!("snapshot inconsistent: {m}")),
            other => other,
        })?;
        Ok(host)
    }

    /// Index bounds that `check()` relies on before it can run.
    fn validate_shape(&self) -> Result<()> {
        let bad = |what: &str| einval(format!("snapshot inconsistent: {what}"));
        let (nv, nf, nm) = (self.vms.len(), self.files.len(), self.space.maps.len());
        for f in &self.files {
            if ![0, 9, 18].contains(&f.order) {
                return Err(bad("guest_memfd folio order"));
            }
            if f.vm >= nv
                || f.mappings.iter().any(|&m| m >= nm)
                || f.vmm_map.is_some_and(|m| m >= nm)
            {
                return Err(bad("guest_memfd refers to a missing VM or mapping"));
            }
            if f.bindings
                .values()
                .any(|b| b.vm >= nv || !self.vms[b.vm].slots.contains_key(&b.slot))
            {
                return Err(bad("binding refers to a missing memslot"));
            }
        }
        for v in &self.vms {
            for s in v.slots.values() {
                if [s.gmem, s.shared].iter().flatten().any(|b| b.file >= nf) {
                    return Err(bad("memslot refers to a missing guest_memfd"));
                }
            }
            if !v.by_gfn.sorted() || v.by_gfn.ids().any(|id| !v.slots.contains_key(&id)) {
                return Err(bad("gfn index refers to a missing memslot"));
            }
        }
        for m in &self.space.maps {
            if m.pages > u64::MAX >> crate::PAGE_SHIFT
                || m.addr.checked_add(m.pages << crate::PAGE_SHIFT).is_none()
            {
                return Err(bad("mapping beyond the address space"));
            }
            if let crate::mapping::MapKind::Gmem { file, .. } = m.kind
                && file >= nf
            {
                return Err(bad("mapping refers to a missing guest_memfd"));
            }
        }
        if !self.frames.content.shape_ok() || self.files.iter().any(|f| !f.content.shape_ok()) {
            return Err(bad("frame content store misshapen"));
        }
        if self.files.iter().any(|f| !f.pages.shape_ok()) {
            return Err(bad("guest_memfd page cache store misshapen"));
        }
        // Every page cache entry and folio names frames of this host (an entry is
        // `pfn + 1 | UPTODATE`: `UPTODATE` alone names none).
        let frames = self.frames.total_pages();
        let names_frame = |e: u32| e & !UPTODATE != 0 && u64::from(entry_frame(e)) < frames;
        if self.files.iter().any(|f| {
            !f.pages.all_entries(names_frame)
                || f.folios
                    .values()
                    .any(|&(pfn, _)| u64::from(pfn) + f.folio_pages() > frames)
        }) {
            return Err(bad("guest_memfd page cache names a frame the host lacks"));
        }
        // The NUMA layout before `check()`: everything there finds a frame's node by it.
        self.frames.check().map_err(|e| bad(&e))?;
        if self
            .space
            .va
            .iter()
            .any(|(&a, &m)| m >= nm || self.space.maps[m].addr != a)
            || self.frames.rmp.values().any(|&(v, _)| v >= nv)
        {
            return Err(bad("address space or RMP refers to a missing object"));
        }
        Ok(())
    }

    /// Write a snapshot to `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_snapshot()?;
        let io = |e: std::io::Error| {
            err(
                e.raw_os_error().unwrap_or(errno::EINVAL),
                format!("{}: {e}", path.display()),
            )
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| einval(format!("{} is not a file path", path.display())))?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut f = fs::File::create(&tmp).map_err(io)?;
        let written = f.write_all(&bytes).and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io(e)
        })
    }

    /// Read a snapshot written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| {
            err(
                e.raw_os_error().unwrap_or(errno::EINVAL),
                format!("{}: {e}", path.display()),
            )
        })?;
        Self::from_snapshot(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::ZeroPolicy;

    /// The host sample of `frames::tests`, plus a shared page written (9).
    fn sample() -> Host {
        let (mut h, vm, _) = crate::frames::tests::sample(ZeroPolicy::OnUse);
        h.guest_access(vm, 0x20_0000, false, Some(9)).unwrap();
        h
    }

    /// A payload altered byte by byte, with a checksum that matches it (as a hand-made
    /// file would have), loads or is refused: it never panics.
    #[test]
    fn altered_payloads_never_panic() {
        let bytes = sample().to_snapshot().unwrap();
        let payload = &bytes[HEADER..];
        let mut loaded = 0;
        for i in 0..payload.len() {
            for v in [0u8, 0xff, payload[i] ^ 0x10] {
                let mut p = payload.to_vec();
                p[i] = v;
                let mut b = bytes[..HEADER].to_vec();
                b[20..24].copy_from_slice(&crc32fast::hash(&p).to_le_bytes());
                b.extend_from_slice(&p);
                loaded += usize::from(Host::from_snapshot(&b).is_ok());
            }
        }
        // Some alterations are harmless (a content value, a counter that check() does
        // not cover); the point is that none of them panicked.
        assert!(loaded < payload.len() * 3);
    }

    #[test]
    fn round_trip_and_rejections() {
        let h = sample();
        let bytes = h.to_snapshot().unwrap();
        let mut g = Host::from_snapshot(&bytes).unwrap();
        assert_eq!(g.guest_access(0, 0x1000, true, None).unwrap(), 7);
        assert_eq!(g.stats(0), h.stats(0));
        assert!(Host::from_snapshot(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(
            Host::from_snapshot(&bad)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        let mut newer = bytes;
        newer[8] = 99;
        assert!(
            Host::from_snapshot(&newer)
                .unwrap_err()
                .to_string()
                .contains("version")
        );
    }

    /// A page cache entry that names no frame of the host (`UPTODATE` alone, a frame past
    /// the last) is refused at load, before anything decodes it.
    #[test]
    fn page_cache_entries_name_host_frames() {
        let h = sample();
        let (f, off) = (0..h.files.len())
            .find_map(|f| {
                h.files[f]
                    .pages
                    .entries(0, u64::MAX)
                    .first()
                    .map(|e| (f, e.0))
            })
            .expect("a page in some page cache");
        let frames = u32::try_from(h.frames.total_pages()).unwrap();
        for e in [UPTODATE, UPTODATE | (frames + 1), frames + 1] {
            let mut g = h.clone();
            g.files[f].pages.set(off, e);
            let err = Host::from_snapshot(&g.to_snapshot().unwrap()).unwrap_err();
            assert!(err.to_string().contains("names a frame"), "{e:#x}: {err}");
        }
        // The last frame is fine.
        let mut g = h.clone();
        g.files[f].pages.set(off, frames | UPTODATE);
        let r = Host::from_snapshot(&g.to_snapshot().unwrap());
        assert!(
            r.as_ref()
                .err()
                .is_none_or(|e| !e.to_string().contains("names a frame"))
        );
    }
}
