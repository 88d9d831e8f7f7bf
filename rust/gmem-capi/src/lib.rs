//! The C ABI of gmem: `libgmem` and `include/gmem.h` (generated from this file by
//! cbindgen; `tests/header.rs` fails when the checked-in header is stale).
//!
//! Every function returns 0 or a negative errno, the errno the Python API raises for the
//! same input (Linux numbering); [`gmem_last_error`] gives the message of the calling
//! thread's last failure. Beyond the kernel's errnos: `-EUCLEAN` means `check` found a
//! broken invariant (Python's `InvariantError`), `-ENOTRECOVERABLE` an internal error
//! (a caught panic), and `-ENOENT` a stat name or index that does not exist.
//!
//! Handles are not pointers to memory: each is a number, never reused, registered when
//! made and looked up on every call, so a freed, forged or wrong-kind handle is `-EBADF`
//! and never dereferenced. Pointers the caller passes (out-parameters, strings, arrays)
//! are the only memory this crate touches on the caller's behalf, and only here.
//!
//! Threads: a host and every handle made from it may be used from one thread at a time.
//! Different hosts are independent. (Calls on one host are serialised by a lock, so a
//! caller that breaks the rule waits rather than corrupting memory, but the order of its
//! operations is then unspecified.)
#![allow(
    unsafe_code,
    reason = "the C ABI reads and writes memory through the caller's pointers"
)]
#![allow(
    non_camel_case_types,
    reason = "C type names of the header (gmem_host, gmem_event ...)"
)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use gmem_core::error::errno;
use gmem_core::{Detail, Error, GmemArg, Host, HostOp, MemRegion, Packed, StrategyKind, VmType};

/// `EUCLEAN`: `check` found a broken invariant.
const EUCLEAN: i32 = 117;
/// `ENOTRECOVERABLE`: an internal error; the call changed nothing the checks can see.
const ENOTRECOVERABLE: i32 = 131;
/// `ENOENT`: no stat of that name or index.
const ENOENT: i32 = 2;

// The core reads event records as little-endian words.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "gmem_event records are little-endian"
);

// ---------------------------------------------------------------- uAPI constants

// The KVM uAPI values the calls take, as the core defines them (checked below).
pub const GMEM_KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
pub const GMEM_KVM_MEM_READONLY: u32 = 1 << 1;
pub const GMEM_KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
pub const GMEM_KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
pub const GMEM_KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;
/// `KVM_EXIT_MMIO`: what a guest access that no memslot backs returns (positive), and its
/// status in `gmem_vm_apply`.
pub const GMEM_KVM_EXIT_MMIO: i32 = 6;
/// `gmem_memory_fault.flags` bit of an MMIO exit: the access was a write.
pub const GMEM_MMIO_EXIT_WRITE: u64 = 1;
pub const GMEM_GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
pub const GMEM_GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`: posted series v12, not merged.
pub const GMEM_GUEST_MEMFD_FLAG_NO_DIRECT_MAP: u64 = 1 << 2;
pub const GMEM_GUEST_MEMFD_FLAG_HUGETLB: u64 = 1 << 4;
pub const GMEM_FALLOC_FL_KEEP_SIZE: u32 = 1;
pub const GMEM_FALLOC_FL_PUNCH_HOLE: u32 = 2;

const _: () = {
    use gmem_core::uapi;
    assert!(GMEM_KVM_MEM_LOG_DIRTY_PAGES == uapi::KVM_MEM_LOG_DIRTY_PAGES);
    assert!(GMEM_KVM_MEM_READONLY == uapi::KVM_MEM_READONLY);
    assert!(GMEM_KVM_MEM_GUEST_MEMFD == uapi::KVM_MEM_GUEST_MEMFD);
    assert!(GMEM_KVM_MEMORY_ATTRIBUTE_PRIVATE == uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE);
    assert!(GMEM_KVM_MEMORY_EXIT_FLAG_PRIVATE == uapi::KVM_MEMORY_EXIT_FLAG_PRIVATE);
    assert!(GMEM_KVM_EXIT_MMIO == uapi::KVM_EXIT_MMIO);
    assert!(GMEM_GUEST_MEMFD_FLAG_MMAP == uapi::GUEST_MEMFD_FLAG_MMAP);
    assert!(GMEM_GUEST_MEMFD_FLAG_INIT_SHARED == uapi::GUEST_MEMFD_FLAG_INIT_SHARED);
    assert!(GMEM_GUEST_MEMFD_FLAG_NO_DIRECT_MAP == uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP);
    assert!(GMEM_GUEST_MEMFD_FLAG_HUGETLB == uapi::GUEST_MEMFD_FLAG_HUGETLB);
    assert!(GMEM_FALLOC_FL_KEEP_SIZE == uapi::FALLOC_FL_KEEP_SIZE);
    assert!(GMEM_FALLOC_FL_PUNCH_HOLE == uapi::FALLOC_FL_PUNCH_HOLE);
};

// ---------------------------------------------------------------- C types

/// A simulated host: RAM, the page allocator, and every VM made on it. Opaque.
pub struct gmem_host {
    _opaque: [u8; 0],
}

/// A VM on a host. Opaque; valid until its host is freed.
pub struct gmem_vm {
    _opaque: [u8; 0],
}

/// A guest_memfd file. Opaque; valid (even once closed) until its host is freed.
pub struct gmem_guest_memfd {
    _opaque: [u8; 0],
}

/// A host (VMM) mapping. Opaque; valid (even once unmapped) until its host is freed.
pub struct gmem_mapping {
    _opaque: [u8; 0],
}

/// One cost override of `gmem_host_new`: `ns` nanoseconds for the step `name`.
#[repr(C)]
pub struct gmem_cost {
    pub name: *const c_char,
    pub ns: u64,
}

/// `KVM_EXIT_MEMORY_FAULT`, as `struct kvm_run`'s `memory_fault`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct gmem_memory_fault {
    pub gpa: u64,
    pub size: u64,
    /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` (bit 3) when the access was private.
    pub flags: u64,
}

/// One event of `gmem_vm_apply`, 25 bytes with no padding: exactly a `gmem.EVENT_DTYPE`
/// record (`op`, then `gfn`, `npages`, `value`, little-endian). Take the fields by value:
/// a packed struct's fields are unaligned.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gmem_event {
    /// A `gmem_op`.
    pub op: u8,
    pub gfn: u64,
    /// 4 KiB pages.
    pub npages: u64,
    /// Written by writes; unused otherwise.
    pub value: u64,
}

const _: () = assert!(size_of::<gmem_event>() == Packed::RECORD);

/// The `op` of a `gmem_event` (Python's `gmem.Op`).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum gmem_op {
    GMEM_OP_CONVERT_PRIVATE = 0,
    GMEM_OP_CONVERT_SHARED = 1,
    GMEM_OP_GUEST_READ_PRIVATE = 2,
    GMEM_OP_GUEST_READ_SHARED = 3,
    GMEM_OP_GUEST_WRITE_PRIVATE = 4,
    GMEM_OP_GUEST_WRITE_SHARED = 5,
    GMEM_OP_PUNCH_HOLE = 6,
    GMEM_OP_PIN = 7,
    GMEM_OP_UNPIN = 8,
    GMEM_OP_DISCARD_SHARED = 9,
    GMEM_OP_HOST_READ = 10,
    GMEM_OP_HOST_WRITE = 11,
    GMEM_OP_ALLOCATE = 12,
    GMEM_OP_MEMORY_FAILURE = 13,
    GMEM_OP_PRE_FAULT = 14,
}

/// Per-event details of `gmem_vm_apply` (the fields of `gmem.DETAIL_DTYPE`, naturally
/// aligned here).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct gmem_detail {
    /// What a read returned.
    pub value: u64,
    /// The gpa of the event's memory-fault exit, if it had one.
    pub fault_gpa: u64,
    /// That exit's flags; bit 31: the exit was answered by an implicit conversion.
    pub fault_flags: u32,
    /// Pages allocated by the event.
    pub allocated: u64,
    /// Pages freed by the event.
    pub freed: u64,
}

// ---------------------------------------------------------------- errors

/// A failed call: errno (positive) and message.
#[derive(Debug)]
struct Fail {
    errno: i32,
    msg: String,
}

impl Fail {
    fn new(errno: i32, msg: impl Into<String>) -> Self {
        Self {
            errno,
            msg: msg.into(),
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let errno = match e {
            Error::Invariant(_) => EUCLEAN,
            // Not a failure: `call` returns `-errno`, so the exit reason comes out positive.
            Error::Mmio { .. } => -GMEM_KVM_EXIT_MMIO,
            _ => e.errno(),
        };
        Self::new(errno, e.to_string())
    }
}

type Res<T = ()> = Result<T, Fail>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of the calling thread's last failed call ("" if none failed yet). The
/// string is owned by the library and valid until the thread's next failing call.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_last_error() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}

fn set_last_error(msg: &str) {
    // A message never holds NUL, but cut at one rather than lose the message.
    let text = msg.split('\0').next().unwrap_or_default();
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|m| *m.borrow_mut() = c);
}

/// Run one call: its failure or panic becomes `-errno` and the thread's last error.
fn call(f: impl FnOnce() -> Res) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(Fail::new(
            ENOTRECOVERABLE,
            format!("internal error: {what}"),
        ))
    });
    match outcome {
        Ok(()) => 0,
        Err(f) => {
            // Setting the message allocates; a failure there must not unwind into C.
            let _ = catch_unwind(|| set_last_error(&f.msg));
            -f.errno
        }
    }
}

// ---------------------------------------------------------------- handles

/// One host and its lock; shared by its handles.
struct Cell {
    host: Mutex<Host>,
}

impl Cell {
    /// The host, for one call. A panic in an earlier call poisoned the lock: the host is
    /// served again only if every invariant still holds.
    fn lock(&self) -> Res<MutexGuard<'_, Host>> {
        match self.host.lock() {
            Ok(h) => Ok(h),
            Err(poisoned) => {
                let h = poisoned.into_inner();
                h.check().map_err(|e| {
                    Fail::new(
                        ENOTRECOVERABLE,
                        format!("host is inconsistent after an internal error: {e}"),
                    )
                })?;
                self.host.clear_poison();
                Ok(h)
            }
        }
    }

    /// Run `f` on the host as one call of the core's API (`Host::call`).
    fn with<T>(&self, f: impl FnOnce(&mut Host) -> gmem_core::Result<T>) -> Res<T> {
        self.with_inspect(f, |_| ())
    }

    /// `with`, showing the error of `f` (with its fields) to `inspect` first.
    fn with_inspect<T>(
        &self,
        f: impl FnOnce(&mut Host) -> gmem_core::Result<T>,
        inspect: impl FnOnce(&Error),
    ) -> Res<T> {
        // `Host::call`: in strict mode, one check of every invariant after a success.
        Ok(self.lock()?.call(f).inspect_err(inspect)?)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Host,
    Vm,
    File,
    Mapping,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Vm => "vm",
            Kind::File => "guest_memfd",
            Kind::Mapping => "mapping",
        }
    }
}

/// A live handle: its host, its kind and the object's index in the host.
#[derive(Clone)]
struct Object {
    cell: Arc<Cell>,
    kind: Kind,
    id: usize,
}

/// Every live handle by number. Numbers are never reused.
struct Registry {
    next: usize,
    objects: BTreeMap<usize, Object>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 1,
    objects: BTreeMap::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // The registry is updated by single inserts and removes; a panic cannot leave it
    // half-changed.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn register<T>(cell: &Arc<Cell>, kind: Kind, id: usize) -> *mut T {
    let mut r = registry();
    let n = r.next;
    r.next += 1;
    r.objects.insert(
        n,
        Object {
            cell: cell.clone(),
            kind,
            id,
        },
    );
    std::ptr::without_provenance_mut(n)
}

fn lookup<T>(handle: *const T, kind: Kind) -> Res<Object> {
    let what = kind.name();
    if handle.is_null() {
        return Err(Fail::new(errno::EBADF, format!("{what} handle is NULL")));
    }
    match registry().objects.get(&handle.addr()) {
        Some(o) if o.kind == kind => Ok(o.clone()),
        Some(o) => Err(Fail::new(
            errno::EBADF,
            format!("handle is a {}, not a {what}", o.kind.name()),
        )),
        None => Err(Fail::new(
            errno::EBADF,
            format!("{what} handle is not live (freed, or never made)"),
        )),
    }
}

// ---------------------------------------------------------------- pointers

/// Store `v` through the out-pointer `out` named `name`; `EINVAL` if it is NULL.
fn put<T>(out: *mut T, name: &str, v: T) -> Res {
    if out.is_null() {
        return Err(Fail::new(errno::EINVAL, format!("{name} is NULL")));
    }
    // SAFETY: `out` is non-null, and the caller promises it points to a writable `T`
    // (the header documents every out-parameter).
    unsafe { out.write_unaligned(v) };
    Ok(())
}

/// Store `v` through `out` unless it is NULL (an optional out-parameter).
fn put_opt<T>(out: *mut T, v: T) {
    if !out.is_null() {
        // SAFETY: non-null, and the caller promises a writable `T` when not NULL.
        unsafe { out.write_unaligned(v) };
    }
}

/// The value at `p`, or `None` when it is NULL (an optional in-parameter).
fn read_opt(p: *const u64) -> Option<u64> {
    // SAFETY: non-null, and the caller promises a readable `uint64_t` when not NULL.
    (!p.is_null()).then(|| unsafe { p.read_unaligned() })
}

/// The NUL-terminated UTF-8 string `p` named `name`; `EINVAL` if NULL or not UTF-8.
fn text<'a>(p: *const c_char, name: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(Fail::new(errno::EINVAL, format!("{name} is NULL")));
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string that stays valid
    // and unchanged for the call.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Fail::new(errno::EINVAL, format!("{name} is not UTF-8")))
}

/// `text`, or `default` when `p` is NULL.
fn text_or<'a>(p: *const c_char, name: &str, default: &'a str) -> Res<&'a str> {
    if p.is_null() {
        Ok(default)
    } else {
        text(p, name)
    }
}

/// The `n` elements at `p` named `name` (NULL allowed only when `n` is 0).
fn array<'a, T>(p: *const T, n: usize, name: &str) -> Res<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::new(errno::EINVAL, format!("{name} is NULL")));
    }
    if n.checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Fail::new(
            errno::EINVAL,
            format!("{name}: {n} elements is too many"),
        ));
    }
    if !p.is_aligned() {
        return Err(Fail::new(errno::EINVAL, format!("{name} is misaligned")));
    }
    // SAFETY: non-null, aligned, of a size that fits `isize`; the caller promises `n`
    // initialised elements that stay valid and unchanged for the call.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The `n` writable elements at `p` named `name` (NULL allowed only when `n` is 0).
fn array_mut<'a, T>(p: *mut T, n: usize, name: &str) -> Res<&'a mut [T]> {
    array(p.cast_const(), n, name)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: checked by `array` above (non-null, aligned, size in range); the caller
    // promises `n` writable elements not otherwise accessed during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// A `&'static CStr` for a stat or cost name (names are few and fixed: each is made once).
fn c_name(name: &'static str) -> *const c_char {
    static NAMES: Mutex<Option<HashMap<&'static str, &'static CStr>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    let c = names
        .get_or_insert_with(HashMap::new)
        .entry(name)
        .or_insert_with(|| {
            let owned = CString::new(name).unwrap_or_default();
            Box::leak(owned.into_boxed_c_str())
        });
    c.as_ptr()
}

// ---------------------------------------------------------------- host

fn new_cell(mut host: Host) -> Arc<Cell> {
    host.strict = std::env::var("GMEM_STRICT").is_ok_and(|v| v == "1");
    Arc::new(Cell {
        host: Mutex::new(host),
    })
}

/// Create a host with `memory` bytes of RAM (page aligned), its cost model overridden by
/// the `ncosts` entries of `costs` (NULL when `ncosts` is 0); the host is stored in
/// `*out`. `-EINVAL` for a bad size or an unknown cost name (nothing is made).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_new(
    memory: u64,
    costs: *const gmem_cost,
    ncosts: usize,
    out: *mut *mut gmem_host,
) -> i32 {
    gmem_host_new_numa(memory, 1, costs, ncosts, out)
}

/// Like `gmem_host_new`, with the memory split evenly over `nodes` NUMA nodes (1 to 64;
/// `memory` a multiple of `nodes` pages, else `-EINVAL`).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_new_numa(
    memory: u64,
    nodes: u32,
    costs: *const gmem_cost,
    ncosts: usize,
    out: *mut *mut gmem_host,
) -> i32 {
    call(|| {
        if out.is_null() {
            return Err(Fail::new(errno::EINVAL, "out is NULL"));
        }
        let mut host =
            Host::with_nodes(memory, nodes).map_err(|e| Fail::new(errno::EINVAL, e.to_string()))?;
        let mut next = *host.costs();
        for c in array(costs, ncosts, "costs")? {
            let name = text(c.name, "cost name")?;
            if !next.set(name, c.ns) {
                return Err(Fail::new(errno::EINVAL, format!("unknown cost {name:?}")));
            }
        }
        *host.costs_mut() = next;
        put(out, "out", register(&new_cell(host), Kind::Host, 0))
    })
}

/// NUMA node `node`'s page counts in `*total` and `*free` (either may be NULL);
/// `-ENOENT` past the host's last node.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_node_pages(
    host: *mut gmem_host,
    node: u32,
    total: *mut u64,
    free: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let h = o.cell.lock()?;
        if node >= h.nr_nodes() {
            return Err(Fail::new(
                ENOENT,
                format!("no node {node} (the host has {})", h.nr_nodes()),
            ));
        }
        let s = &h.node_stats()[node as usize];
        put_opt(total, s.total_pages);
        put_opt(free, s.free_pages);
        Ok(())
    })
}

/// `set_mempolicy()` for the VMM: policy `mode` (`MPOL_*`) over the nodes of `nodemask`
/// (bit `n`: node `n`); it places pages where no `gmem_mapping_mbind` policy is set.
/// `-EINVAL` as `gmem_mapping_mbind`'s.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_set_mempolicy(host: *mut gmem_host, mode: u32, nodemask: u64) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let nodes = gmem_core::numa::nodes_of(nodemask);
        o.cell.with(|h| h.set_mempolicy(mode, &nodes))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_free(host: *mut gmem_host) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let dead = {
            let mut r = registry();
            let mine: Vec<usize> = r
                .objects
                .iter()
                .filter(|(_, x)| Arc::ptr_eq(&x.cell, &o.cell))
                .map(|(n, _)| *n)
                .collect();
            mine.into_iter()
                .filter_map(|n| r.objects.remove(&n))
                .collect::<Vec<_>>()
        };
        // The host is dropped here, outside the registry lock, unless another thread is
        // inside a call on it (then when that call ends).
        drop(dead);
        Ok(())
    })
}

/// Set the cost of one modelled step (`ns` nanoseconds). `-EINVAL` for an unknown name.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_set_cost(host: *mut gmem_host, name: *const c_char, ns: u64) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let name = text(name, "name")?;
        let mut h = o.cell.lock()?;
        if !h.costs_mut().set(name, ns) {
            return Err(Fail::new(errno::EINVAL, format!("unknown cost {name:?}")));
        }
        Ok(())
    })
}

/// The host-wide counter `index` (0, 1, ... until `-ENOENT`): its name (a static string)
/// in `*name` and value in `*value`. The counters are those of Python's `host.stats()`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_stat(
    host: *mut gmem_host,
    index: usize,
    name: *mut *const c_char,
    value: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let items = host_stats(&*o.cell.lock()?);
        stat_at(&items, index, name, value)
    })
}

/// The host-wide counter called `name` in `*value`; `-ENOENT` if there is none.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_stat_get(
    host: *mut gmem_host,
    name: *const c_char,
    value: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let items = host_stats(&*o.cell.lock()?);
        stat_named(&items, text(name, "name")?, value)
    })
}

fn host_stats(h: &Host) -> Vec<(&'static str, u64)> {
    vec![
        ("total_pages", h.total_pages()),
        ("free_pages", h.free_pages()),
        ("pages_allocated", h.total_pages() - h.free_pages()),
        ("heap_bytes", h.heap_bytes() as u64),
    ]
}

fn stat_at(
    items: &[(&'static str, u64)],
    index: usize,
    name: *mut *const c_char,
    value: *mut u64,
) -> Res {
    let Some(&(n, v)) = items.get(index) else {
        return Err(Fail::new(
            ENOENT,
            format!("no stat {index} (there are {})", items.len()),
        ));
    };
    put_opt(name, c_name(n));
    put_opt(value, v);
    Ok(())
}

fn stat_named(items: &[(&'static str, u64)], name: &str, value: *mut u64) -> Res {
    let Some(&(_, v)) = items.iter().find(|(n, _)| *n == name) else {
        return Err(Fail::new(ENOENT, format!("no stat {name:?}")));
    };
    put(value, "value", v)
}

/// Check every invariant of every VM and of the allocator; `-EUCLEAN` names the broken
/// one in `gmem_last_error()`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_check(host: *mut gmem_host) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        Ok(o.cell.lock()?.check()?)
    })
}

/// Write a snapshot of the whole host (all VMs, files, mappings) to `path`, atomically.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_save(host: *mut gmem_host, path: *const c_char) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let path = text(path, "path")?;
        Ok(o.cell.lock()?.save(Path::new(path))?)
    })
}

/// Read a snapshot written by `gmem_host_save` into a new host in `*out`. A truncated,
/// corrupted, inconsistent or newer-version file is `-EINVAL` and makes nothing. Handles
/// of the saved host's VMs, files and mappings are not restored: reach them with
/// `gmem_host_vm`, `gmem_host_guest_memfd` and `gmem_host_mapping`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_load(path: *const c_char, out: *mut *mut gmem_host) -> i32 {
    call(|| {
        let path = text(path, "path")?;
        if out.is_null() {
            return Err(Fail::new(errno::EINVAL, "out is NULL"));
        }
        let host = Host::load(Path::new(path))?;
        put(out, "out", register(&new_cell(host), Kind::Host, 0))
    })
}

/// A handle for the host's object number `index` of `kind`, of which it has `count`.
fn nth<T>(
    host: *mut gmem_host,
    index: usize,
    kind: Kind,
    count: fn(&Host) -> usize,
    out: *mut *mut T,
) -> Res {
    let o = lookup(host, Kind::Host)?;
    let n = count(&*o.cell.lock()?);
    if index >= n {
        return Err(Fail::new(
            ENOENT,
            format!("no {} {index} (the host has {n})", kind.name()),
        ));
    }
    if out.is_null() {
        return Err(Fail::new(errno::EINVAL, "out is NULL"));
    }
    put(out, "out", register(&o.cell, kind, index))
}

/// A new handle for the host's VM number `index` (creation order; `-ENOENT` past the
/// last): how a loaded snapshot's VMs are reached.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_vm(host: *mut gmem_host, index: usize, out: *mut *mut gmem_vm) -> i32 {
    call(|| nth(host, index, Kind::Vm, Host::nr_vms, out))
}

/// A new handle for the host's guest_memfd number `index` (closed ones included).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_guest_memfd(
    host: *mut gmem_host,
    index: usize,
    out: *mut *mut gmem_guest_memfd,
) -> i32 {
    call(|| nth(host, index, Kind::File, Host::nr_files, out))
}

/// A new handle for the host's mapping number `index` (unmapped ones included).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_mapping(
    host: *mut gmem_host,
    index: usize,
    out: *mut *mut gmem_mapping,
) -> i32 {
    call(|| nth(host, index, Kind::Mapping, Host::nr_mappings, out))
}

/// Create a VM of `vm_type` ("sw_protected", "pkvm", "tdx", "snp", or "default" for a VM
/// without private memory, `KVM_X86_DEFAULT_VM`; NULL for "sw_protected") converting with the design `strategy` ("dual", "inplace", "realloc",
/// "two_offsets", "attr_hook"; NULL for "dual"). `-EINVAL` for an unknown name.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_create_vm(
    host: *mut gmem_host,
    vm_type: *const c_char,
    strategy: *const c_char,
    out: *mut *mut gmem_vm,
) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        let t = VmType::parse(text_or(vm_type, "vm_type", "sw_protected")?)?;
        let s = StrategyKind::parse(text_or(strategy, "strategy", "dual")?)?;
        if out.is_null() {
            return Err(Fail::new(errno::EINVAL, "out is NULL"));
        }
        let id = o.cell.lock()?.create_vm(t, s);
        put(out, "out", register(&o.cell, Kind::Vm, id))
    })
}

/// Map `length` bytes of anonymous `MAP_SHARED` memory of the VMM.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_host_mmap_anonymous(
    host: *mut gmem_host,
    length: u64,
    out: *mut *mut gmem_mapping,
) -> i32 {
    call(|| {
        let o = lookup(host, Kind::Host)?;
        if out.is_null() {
            return Err(Fail::new(errno::EINVAL, "out is NULL"));
        }
        let id = o.cell.with(|h| h.mmap_anonymous(length))?;
        put(out, "out", register(&o.cell, Kind::Mapping, id))
    })
}

// ---------------------------------------------------------------- VM

/// `KVM_CREATE_GUEST_MEMFD`: a guest_memfd of `size` bytes, `flags`
/// (`GUEST_MEMFD_FLAG_*`) and folio order `page_order` (0 for 4 KiB pages).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_create_guest_memfd(
    vm: *mut gmem_vm,
    size: u64,
    flags: u64,
    page_order: u32,
    out: *mut *mut gmem_guest_memfd,
) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        if out.is_null() {
            return Err(Fail::new(errno::EINVAL, "out is NULL"));
        }
        let id = o
            .cell
            .with(|h| h.create_guest_memfd(o.id, size, flags, page_order))?;
        put(out, "out", register(&o.cell, Kind::File, id))
    })
}

/// The guest_memfd argument of a memslot, seen from the host of `vm`.
fn gmem_arg(vm: &Object, file: *const gmem_guest_memfd) -> Res<GmemArg> {
    if file.is_null() {
        return Ok(GmemArg::None);
    }
    let f = lookup(file, Kind::File)?;
    if !Arc::ptr_eq(&f.cell, &vm.cell) {
        return Ok(GmemArg::Foreign);
    }
    // A closed file has no fd: the kernel sees a number that is no longer open.
    let fd = vm.cell.lock()?.file(f.id).fd();
    Ok(GmemArg::Fd(fd.map_or(-1, i64::from)))
}

/// `KVM_SET_USER_MEMORY_REGION2`: memslot `slot` maps `memory_size` bytes at
/// `guest_phys_addr` to the VMM's `userspace_addr` and (with `KVM_MEM_GUEST_MEMFD` in
/// `flags`) to `guest_memfd` (NULL for none) from `guest_memfd_offset`. The
/// `two_offsets` design's shared range: `shared_guest_memfd` (NULL for none) from
/// `*shared_offset` (NULL for none).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_set_user_memory_region2(
    vm: *mut gmem_vm,
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
    guest_memfd: *const gmem_guest_memfd,
    guest_memfd_offset: u64,
    shared_guest_memfd: *const gmem_guest_memfd,
    shared_offset: *const u64,
) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        let shared_offset = read_opt(shared_offset);
        let r = MemRegion {
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd: gmem_arg(&o, guest_memfd)?,
            guest_memfd_offset,
            shared_guest_memfd: gmem_arg(&o, shared_guest_memfd)?,
            shared_offset,
        };
        o.cell.with(|h| h.set_user_memory_region2(o.id, r))
    })
}

/// `KVM_SET_MEMORY_ATTRIBUTES` over `[address, address + size)`. An in-place
/// to-private conversion refused for an elevated page reference is `-EAGAIN`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_set_memory_attributes(
    vm: *mut gmem_vm,
    address: u64,
    size: u64,
    attributes: u64,
    flags: u64,
) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        o.cell
            .with(|h| h.set_memory_attributes(o.id, address, size, attributes, flags))
    })
}

/// The memory attributes of page `gfn` in `*attributes`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_get_memory_attributes(
    vm: *mut gmem_vm,
    gfn: u64,
    attributes: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        let a = o.cell.lock()?.get_memory_attributes(o.id, gfn);
        put(attributes, "attributes", a)
    })
}

/// One guest access; a memory-fault exit fills `*fault` (when not NULL) and is `-EFAULT`;
/// an MMIO exit fills it too (`gpa`, `size` 8, `flags` `GMEM_MMIO_EXIT_WRITE` for a write)
/// and is `GMEM_KVM_EXIT_MMIO`.
fn guest_access(
    vm: *mut gmem_vm,
    gpa: u64,
    private: bool,
    write: Option<u64>,
    fault: *mut gmem_memory_fault,
) -> Res<u64> {
    let o = lookup(vm, Kind::Vm)?;
    o.cell.with_inspect(
        |h| h.guest_access(o.id, gpa, private, write),
        |e| match *e {
            Error::MemoryFault { gpa, size, flags } => {
                put_opt(fault, gmem_memory_fault { gpa, size, flags });
            }
            Error::Mmio {
                phys_addr,
                len,
                is_write,
            } => put_opt(
                fault,
                gmem_memory_fault {
                    gpa: phys_addr,
                    size: u64::from(len),
                    flags: if is_write { GMEM_MMIO_EXIT_WRITE } else { 0 },
                },
            ),
            _ => {}
        },
    )
}

/// A guest read of the page at `gpa`, private or shared: the page's value in `*value`
/// (when not NULL). `KVM_EXIT_MEMORY_FAULT` is `-EFAULT` with the exit in `*fault` (when
/// not NULL); `KVM_EXIT_MMIO` returns `GMEM_KVM_EXIT_MMIO` with the access in `*fault`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_guest_read(
    vm: *mut gmem_vm,
    gpa: u64,
    private: bool,
    value: *mut u64,
    fault: *mut gmem_memory_fault,
) -> i32 {
    call(|| {
        let v = guest_access(vm, gpa, private, None, fault)?;
        put_opt(value, v);
        Ok(())
    })
}

/// A guest write of `value` to the page at `gpa`, private or shared.
/// `KVM_EXIT_MEMORY_FAULT` is `-EFAULT` with the exit in `*fault` (when not NULL);
/// `KVM_EXIT_MMIO` returns `GMEM_KVM_EXIT_MMIO` with the access in `*fault`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_guest_write(
    vm: *mut gmem_vm,
    gpa: u64,
    value: u64,
    private: bool,
    fault: *mut gmem_memory_fault,
) -> i32 {
    call(|| guest_access(vm, gpa, private, Some(value), fault).map(drop))
}

/// Run the `n` events at `events` (NULL when `n` is 0) on `vm` in order: the status of
/// each (0, `-errno`, or `GMEM_KVM_EXIT_MMIO`) in `statuses[i]`, and, when `details` is not NULL, its details
/// in `details[i]`. A failing event does not stop the batch; the call itself fails only
/// for bad arguments (then nothing ran).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_apply(
    vm: *mut gmem_vm,
    events: *const gmem_event,
    n: usize,
    statuses: *mut i32,
    details: *mut gmem_detail,
) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        let ev = array(events, n, "events")?;
        let statuses = array_mut(statuses, n, "statuses")?;
        let details = if details.is_null() {
            None
        } else {
            Some(array_mut(details, n, "details")?)
        };
        // SAFETY: `gmem_event` is 25 bytes of plain integers with no padding (asserted
        // above), so the `ev.len()` records are `size_of_val(ev)` initialised bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(ev.as_ptr().cast::<u8>(), size_of_val(ev)) };
        let packed = Packed::new(bytes)?;
        let mut d: Option<Vec<Detail>> = details.as_ref().map(|_| Vec::with_capacity(n));
        let s = o.cell.with(|h| h.apply_events(o.id, &packed, d.as_mut()))?;
        statuses.copy_from_slice(&s);
        if let (Some(out), Some(d)) = (details, d) {
            for (slot, x) in out.iter_mut().zip(d) {
                *slot = gmem_detail {
                    value: x.value,
                    fault_gpa: x.fault_gpa,
                    fault_flags: x.fault_flags,
                    allocated: x.allocated,
                    freed: x.freed,
                };
            }
        }
        Ok(())
    })
}

fn vm_stats(h: &Host, vm: usize) -> Vec<(&'static str, u64)> {
    let mut items = h.stats(vm).items();
    items.push(("attr_intervals", h.attr_intervals(vm)));
    items
}

/// The VM's counter `index` (0, 1, ... until `-ENOENT`): its name (a static string) in
/// `*name` and value in `*value` (either may be NULL). The counters and their order are
/// those of Python's `vm.stats()`; new counters may be added, so iterate or ask by name.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_stat(
    vm: *mut gmem_vm,
    index: usize,
    name: *mut *const c_char,
    value: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        let items = vm_stats(&*o.cell.lock()?, o.id);
        stat_at(&items, index, name, value)
    })
}

/// The VM's counter called `name` in `*value`; `-ENOENT` if there is none.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_stat_get(vm: *mut gmem_vm, name: *const c_char, value: *mut u64) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        let items = vm_stats(&*o.cell.lock()?, o.id);
        stat_named(&items, text(name, "name")?, value)
    })
}

/// Check every invariant of the VM; `-EUCLEAN` names the broken one in
/// `gmem_last_error()`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_vm_check(vm: *mut gmem_vm) -> i32 {
    call(|| {
        let o = lookup(vm, Kind::Vm)?;
        Ok(o.cell.lock()?.check_vm(o.id)?)
    })
}

// ---------------------------------------------------------------- guest_memfd

/// `fallocate(mode, offset, length)` on a guest_memfd (`FALLOC_FL_*` modes).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_guest_memfd_fallocate(
    file: *mut gmem_guest_memfd,
    mode: u32,
    offset: u64,
    length: u64,
) -> i32 {
    call(|| {
        let o = lookup(file, Kind::File)?;
        o.cell
            .with(|h| h.gmem_fallocate(o.id, mode, offset, length))
    })
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd (in-place designs) over
/// `[offset, offset + size)`. A conversion refused for an elevated page reference is
/// `-EAGAIN` with the offending file offset in `*error_offset` (when not NULL).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_guest_memfd_set_memory_attributes2(
    file: *mut gmem_guest_memfd,
    offset: u64,
    size: u64,
    attributes: u64,
    flags: u64,
    error_offset: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(file, Kind::File)?;
        o.cell.with_inspect(
            |h| h.set_memory_attributes2(o.id, offset, size, attributes, flags),
            |e| {
                if let Error::Busy { error_offset: at } = *e {
                    put_opt(error_offset, at);
                }
            },
        )
    })
}

/// `mmap()` of a guest_memfd from `offset`, `*length` bytes (NULL: to the end of the
/// file), `MAP_SHARED` when `shared` (else `MAP_PRIVATE`).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_guest_memfd_mmap(
    file: *mut gmem_guest_memfd,
    offset: u64,
    length: *const u64,
    shared: bool,
    out: *mut *mut gmem_mapping,
) -> i32 {
    call(|| {
        let o = lookup(file, Kind::File)?;
        let length = read_opt(length);
        if out.is_null() {
            return Err(Fail::new(errno::EINVAL, "out is NULL"));
        }
        let id = o.cell.with(|h| h.gmem_mmap(o.id, offset, length, shared))?;
        put(out, "out", register(&o.cell, Kind::Mapping, id))
    })
}

/// `memory_failure()` on the page at byte `offset` of the guest_memfd (mainline
/// `kvm_gmem_error_folio()`): its stage-2 and host mappings go, the page stays poisoned
/// in the file until its hole is punched. Later guest accesses fail with `-EHWPOISON`
/// (133), host accesses through a mapping with `-EFAULT` (SIGBUS). `-EINVAL` for an
/// unaligned offset or one beyond the size, `-ENOENT` where no page is present (a
/// released file has none), `-EHWPOISON` for a page already poisoned.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_guest_memfd_memory_failure(file: *mut gmem_guest_memfd, offset: u64) -> i32 {
    call(|| {
        let o = lookup(file, Kind::File)?;
        o.cell.with(|h| h.memory_failure(o.id, offset))
    })
}

/// `close()` the guest_memfd's fd (the handle stays valid; later calls on it are
/// `-EBADF` as the kernel's would be).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_guest_memfd_close(file: *mut gmem_guest_memfd) -> i32 {
    call(|| {
        let o = lookup(file, Kind::File)?;
        o.cell.with(|h| h.gmem_close(o.id))
    })
}

// ---------------------------------------------------------------- mappings

/// The mapping's start address (what a memslot's `userspace_addr` takes) in `*addr`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_addr(mapping: *mut gmem_mapping, addr: *mut u64) -> i32 {
    call(|| {
        let o = lookup(mapping, Kind::Mapping)?;
        let a = o.cell.lock()?.mapping(o.id).addr;
        put(addr, "addr", a)
    })
}

fn map_op(mapping: *mut gmem_mapping, offset: u64, op: HostOp) -> Res<u64> {
    let o = lookup(mapping, Kind::Mapping)?;
    o.cell.with(|h| h.map_access(o.id, offset, op))
}

/// A host read of the page at `offset` in the mapping: its value in `*value` (when not
/// NULL). A page the host may not touch is `-EFAULT` (SIGBUS in the kernel).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_read(
    mapping: *mut gmem_mapping,
    offset: u64,
    value: *mut u64,
) -> i32 {
    call(|| {
        put_opt(value, map_op(mapping, offset, HostOp::Read)?);
        Ok(())
    })
}

/// A host write of `value` to the page at `offset` in the mapping.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_write(mapping: *mut gmem_mapping, offset: u64, value: u64) -> i32 {
    call(|| map_op(mapping, offset, HostOp::Write(value)).map(drop))
}

/// Pin the page at `offset` (`get_user_pages(FOLL_PIN)`).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_pin(mapping: *mut gmem_mapping, offset: u64) -> i32 {
    call(|| map_op(mapping, offset, HostOp::Pin).map(drop))
}

/// Drop one pin of the page at `offset`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_unpin(mapping: *mut gmem_mapping, offset: u64) -> i32 {
    call(|| map_op(mapping, offset, HostOp::Unpin).map(drop))
}

/// `madvise(MADV_DONTNEED)` over `[offset, offset + length)` of the mapping.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_discard(
    mapping: *mut gmem_mapping,
    offset: u64,
    length: u64,
) -> i32 {
    call(|| {
        let o = lookup(mapping, Kind::Mapping)?;
        o.cell.with(|h| h.map_discard(o.id, offset, length))
    })
}

/// `mbind()` over `[offset, offset + length)` of the mapping: policy `mode` (`MPOL_*`)
/// over the nodes of `nodemask` (bit `n`: node `n`). On a guest_memfd mapping the policy
/// is the file's; it places pages allocated later. Errors as mbind(2): an unknown mode,
/// an unaligned offset, an empty or host-less node set for a mode that needs nodes is
/// `-EINVAL`; a range past the mapping `-EFAULT`.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_mbind(
    mapping: *mut gmem_mapping,
    offset: u64,
    length: u64,
    mode: u32,
    nodemask: u64,
) -> i32 {
    call(|| {
        let o = lookup(mapping, Kind::Mapping)?;
        let nodes = gmem_core::numa::nodes_of(nodemask);
        o.cell
            .with(|h| h.map_mbind(o.id, offset, length, mode, &nodes))
    })
}

/// `get_mempolicy(MPOL_F_ADDR)` for the page at `offset`: its mode in `*mode` and nodes
/// in `*nodemask` (either may be NULL); `MPOL_DEFAULT` and 0 where no policy is set.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_get_mempolicy(
    mapping: *mut gmem_mapping,
    offset: u64,
    mode: *mut u32,
    nodemask: *mut u64,
) -> i32 {
    call(|| {
        let o = lookup(mapping, Kind::Mapping)?;
        let (m, nodes) = o.cell.with(|h| h.map_get_mempolicy(o.id, offset))?;
        put_opt(mode, m);
        put_opt(nodemask, nodes.iter().fold(0u64, |a, &n| a | 1 << n));
        Ok(())
    })
}

/// The NUMA node of the page mapped at `offset` in `*node` (`move_pages()` status);
/// `-ENOENT` when none is mapped there.
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_page_node(
    mapping: *mut gmem_mapping,
    offset: u64,
    node: *mut u32,
) -> i32 {
    call(|| {
        let o = lookup(mapping, Kind::Mapping)?;
        let n = o.cell.with(|h| h.map_page_node(o.id, offset))?;
        put(node, "node", n)
    })
}

/// `munmap()` the mapping (the handle stays valid; later accesses fail as the kernel's).
#[unsafe(no_mangle)]
pub extern "C" fn gmem_mapping_unmap(mapping: *mut gmem_mapping) -> i32 {
    call(|| {
        let o = lookup(mapping, Kind::Mapping)?;
        o.cell.with(|h| h.map_unmap(o.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_enotrecoverable_with_its_message() {
        let r = call(|| panic!("boom"));
        assert_eq!(r, -ENOTRECOVERABLE);
        // SAFETY: the library's own NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(gmem_last_error()) };
        assert_eq!(msg.to_str().unwrap(), "internal error: boom");
    }

    #[test]
    fn a_host_poisoned_by_a_panic_is_served_again_when_it_checks_clean() {
        let cell = new_cell(Host::new(1 << 24).unwrap());
        let r = call(|| {
            let _held = cell.lock()?;
            panic!("inside the lock")
        });
        assert_eq!(r, -ENOTRECOVERABLE);
        assert!(cell.host.is_poisoned());
        assert!(cell.lock().is_ok());
        assert!(!cell.host.is_poisoned());
    }
}
