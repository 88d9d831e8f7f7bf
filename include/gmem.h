/* gmem: a model of Linux KVM guest_memfd memory, as a C library.
 *
 * Generated from rust/gmem-capi/src/lib.rs by cbindgen; do not edit (make header).
 *
 * Every function returns 0 or a negative errno (Linux numbering), the errno the Python
 * API raises for the same input; gmem_last_error() gives the message of the calling
 * thread's last failure. Besides the kernel's errnos: -EUCLEAN, a check found a broken
 * invariant; -ENOTRECOVERABLE, an internal error; -ENOENT, no such stat; -EBADF, a NULL,
 * freed or wrong-kind handle; -EINVAL, a NULL required pointer or a bad string.
 *
 * Handles are opaque and never dereferenced by the caller. A host and every handle made
 * from it may be used from one thread at a time; different hosts are independent.
 * Freeing a host invalidates all of its handles (later use is -EBADF, not a crash).
 */

#ifndef GMEM_H
#define GMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GMEM_KVM_MEM_LOG_DIRTY_PAGES (1 << 0)

#define GMEM_KVM_MEM_READONLY (1 << 1)

#define GMEM_KVM_MEM_GUEST_MEMFD (1 << 2)

#define GMEM_KVM_MEMORY_ATTRIBUTE_PRIVATE (1 << 3)

#define GMEM_KVM_MEMORY_EXIT_FLAG_PRIVATE (1 << 3)

// `KVM_EXIT_MMIO`: what a guest access that no memslot backs returns (positive), and its
// status in `gmem_vm_apply`.
#define GMEM_KVM_EXIT_MMIO 6

// `gmem_memory_fault.flags` bit of an MMIO exit: the access was a write.
#define GMEM_MMIO_EXIT_WRITE 1

#define GMEM_GUEST_MEMFD_FLAG_MMAP (1 << 0)

#define GMEM_GUEST_MEMFD_FLAG_INIT_SHARED (1 << 1)

// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`: posted series v12, not merged.
#define GMEM_GUEST_MEMFD_FLAG_NO_DIRECT_MAP (1 << 2)

#define GMEM_GUEST_MEMFD_FLAG_HUGETLB (1 << 4)

#define GMEM_FALLOC_FL_KEEP_SIZE 1

#define GMEM_FALLOC_FL_PUNCH_HOLE 2

// The `op` of a `gmem_event` (Python's `gmem.Op`).
enum gmem_op
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint8_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
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
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum gmem_op gmem_op;
#else
typedef uint8_t gmem_op;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

// A guest_memfd file. Opaque; valid (even once closed) until its host is freed.
typedef struct gmem_guest_memfd gmem_guest_memfd;

// A simulated host: RAM, the page allocator, and every VM made on it. Opaque.
typedef struct gmem_host gmem_host;

// A host (VMM) mapping. Opaque; valid (even once unmapped) until its host is freed.
typedef struct gmem_mapping gmem_mapping;

// A VM on a host. Opaque; valid until its host is freed.
typedef struct gmem_vm gmem_vm;

// One cost override of `gmem_host_new`: `ns` nanoseconds for the step `name`.
typedef struct gmem_cost {
  const char *name;
  uint64_t ns;
} gmem_cost;

// `KVM_EXIT_MEMORY_FAULT`, as `struct kvm_run`'s `memory_fault`.
typedef struct gmem_memory_fault {
  uint64_t gpa;
  uint64_t size;
  // `KVM_MEMORY_EXIT_FLAG_PRIVATE` (bit 3) when the access was private.
  uint64_t flags;
} gmem_memory_fault;

// One event of `gmem_vm_apply`, 25 bytes with no padding: exactly a `gmem.EVENT_DTYPE`
// record (`op`, then `gfn`, `npages`, `value`, little-endian). Take the fields by value:
// a packed struct's fields are unaligned.
typedef struct __attribute__((packed)) gmem_event {
  // A `gmem_op`.
  uint8_t op;
  uint64_t gfn;
  // 4 KiB pages.
  uint64_t npages;
  // Written by writes; unused otherwise.
  uint64_t value;
} gmem_event;

// Per-event details of `gmem_vm_apply` (the fields of `gmem.DETAIL_DTYPE`, naturally
// aligned here).
typedef struct gmem_detail {
  // What a read returned.
  uint64_t value;
  // The gpa of the event's memory-fault exit, if it had one.
  uint64_t fault_gpa;
  // That exit's flags; bit 31: the exit was answered by an implicit conversion.
  uint32_t fault_flags;
  // Pages allocated by the event.
  uint64_t allocated;
  // Pages freed by the event.
  uint64_t freed;
} gmem_detail;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The message of the calling thread's last failed call ("" if none failed yet). The
// string is owned by the library and valid until the thread's next failing call.
const char *gmem_last_error(void);

// Create a host with `memory` bytes of RAM (page aligned), its cost model overridden by
// the `ncosts` entries of `costs` (NULL when `ncosts` is 0); the host is stored in
// `*out`. `-EINVAL` for a bad size or an unknown cost name (nothing is made).
int32_t gmem_host_new(uint64_t memory,
                      const struct gmem_cost *costs,
                      size_t ncosts,
                      struct gmem_host **out);

// Like `gmem_host_new`, with the memory split evenly over `nodes` NUMA nodes (1 to 64;
// `memory` a multiple of `nodes` pages, else `-EINVAL`).
int32_t gmem_host_new_numa(uint64_t memory,
                           uint32_t nodes,
                           const struct gmem_cost *costs,
                           size_t ncosts,
                           struct gmem_host **out);

// NUMA node `node`'s page counts in `*total` and `*free` (either may be NULL);
// `-ENOENT` past the host's last node.
int32_t gmem_host_node_pages(struct gmem_host *host,
                             uint32_t node,
                             uint64_t *total,
                             uint64_t *free);

// `set_mempolicy()` for the VMM: policy `mode` (`MPOL_*`) over the nodes of `nodemask`
// (bit `n`: node `n`); it places pages where no `gmem_mapping_mbind` policy is set.
// `-EINVAL` as `gmem_mapping_mbind`'s.
int32_t gmem_host_set_mempolicy(struct gmem_host *host, uint32_t mode, uint64_t nodemask);

int32_t gmem_host_free(struct gmem_host *host);

// Set the cost of one modelled step (`ns` nanoseconds). `-EINVAL` for an unknown name.
int32_t gmem_host_set_cost(struct gmem_host *host, const char *name, uint64_t ns);

// The host-wide counter `index` (0, 1, ... until `-ENOENT`): its name (a static string)
// in `*name` and value in `*value`. The counters are those of Python's `host.stats()`.
int32_t gmem_host_stat(struct gmem_host *host, size_t index, const char **name, uint64_t *value);

// The host-wide counter called `name` in `*value`; `-ENOENT` if there is none.
int32_t gmem_host_stat_get(struct gmem_host *host, const char *name, uint64_t *value);

// Check every invariant of every VM and of the allocator; `-EUCLEAN` names the broken
// one in `gmem_last_error()`.
int32_t gmem_host_check(struct gmem_host *host);

// Write a snapshot of the whole host (all VMs, files, mappings) to `path`, atomically.
int32_t gmem_host_save(struct gmem_host *host, const char *path);

// Read a snapshot written by `gmem_host_save` into a new host in `*out`. A truncated,
// corrupted, inconsistent or newer-version file is `-EINVAL` and makes nothing. Handles
// of the saved host's VMs, files and mappings are not restored: reach them with
// `gmem_host_vm`, `gmem_host_guest_memfd` and `gmem_host_mapping`.
int32_t gmem_load(const char *path, struct gmem_host **out);

// A new handle for the host's VM number `index` (creation order; `-ENOENT` past the
// last): how a loaded snapshot's VMs are reached.
int32_t gmem_host_vm(struct gmem_host *host, size_t index, struct gmem_vm **out);

// A new handle for the host's guest_memfd number `index` (closed ones included).
int32_t gmem_host_guest_memfd(struct gmem_host *host, size_t index, struct gmem_guest_memfd **out);

// A new handle for the host's mapping number `index` (unmapped ones included).
int32_t gmem_host_mapping(struct gmem_host *host, size_t index, struct gmem_mapping **out);

// Create a VM of `vm_type` ("sw_protected", "pkvm", "tdx", "snp", or "default" for a VM
// without private memory, `KVM_X86_DEFAULT_VM`; NULL for "sw_protected") converting with the design `strategy` ("dual", "inplace", "realloc",
// "two_offsets", "attr_hook"; NULL for "dual"). `-EINVAL` for an unknown name.
int32_t gmem_host_create_vm(struct gmem_host *host,
                            const char *vm_type,
                            const char *strategy,
                            struct gmem_vm **out);

// Map `length` bytes of anonymous `MAP_SHARED` memory of the VMM.
int32_t gmem_host_mmap_anonymous(struct gmem_host *host,
                                 uint64_t length,
                                 struct gmem_mapping **out);

// `KVM_CREATE_GUEST_MEMFD`: a guest_memfd of `size` bytes, `flags`
// (`GUEST_MEMFD_FLAG_*`) and folio order `page_order` (0 for 4 KiB pages).
int32_t gmem_vm_create_guest_memfd(struct gmem_vm *vm,
                                   uint64_t size,
                                   uint64_t flags,
                                   uint32_t page_order,
                                   struct gmem_guest_memfd **out);

// `KVM_SET_USER_MEMORY_REGION2`: memslot `slot` maps `memory_size` bytes at
// `guest_phys_addr` to the VMM's `userspace_addr` and (with `KVM_MEM_GUEST_MEMFD` in
// `flags`) to `guest_memfd` (NULL for none) from `guest_memfd_offset`. The
// `two_offsets` design's shared range: `shared_guest_memfd` (NULL for none) from
// `*shared_offset` (NULL for none).
int32_t gmem_vm_set_user_memory_region2(struct gmem_vm *vm,
                                        uint32_t slot,
                                        uint32_t flags,
                                        uint64_t guest_phys_addr,
                                        uint64_t memory_size,
                                        uint64_t userspace_addr,
                                        const struct gmem_guest_memfd *guest_memfd,
                                        uint64_t guest_memfd_offset,
                                        const struct gmem_guest_memfd *shared_guest_memfd,
                                        const uint64_t *shared_offset);

// `KVM_SET_MEMORY_ATTRIBUTES` over `[address, address + size)`. An in-place
// to-private conversion refused for an elevated page reference is `-EAGAIN`.
int32_t gmem_vm_set_memory_attributes(struct gmem_vm *vm,
                                      uint64_t address,
                                      uint64_t size,
                                      uint64_t attributes,
                                      uint64_t flags);

// The memory attributes of page `gfn` in `*attributes`.
int32_t gmem_vm_get_memory_attributes(struct gmem_vm *vm, uint64_t gfn, uint64_t *attributes);

// A guest read of the page at `gpa`, private or shared: the page's value in `*value`
// (when not NULL). `KVM_EXIT_MEMORY_FAULT` is `-EFAULT` with the exit in `*fault` (when
// not NULL); `KVM_EXIT_MMIO` returns `GMEM_KVM_EXIT_MMIO` with the access in `*fault`.
int32_t gmem_vm_guest_read(struct gmem_vm *vm,
                           uint64_t gpa,
                           bool private_,
                           uint64_t *value,
                           struct gmem_memory_fault *fault);

// A guest write of `value` to the page at `gpa`, private or shared.
// `KVM_EXIT_MEMORY_FAULT` is `-EFAULT` with the exit in `*fault` (when not NULL);
// `KVM_EXIT_MMIO` returns `GMEM_KVM_EXIT_MMIO` with the access in `*fault`.
int32_t gmem_vm_guest_write(struct gmem_vm *vm,
                            uint64_t gpa,
                            uint64_t value,
                            bool private_,
                            struct gmem_memory_fault *fault);

// Run the `n` events at `events` (NULL when `n` is 0) on `vm` in order: the status of
// each (0, `-errno`, or `GMEM_KVM_EXIT_MMIO`) in `statuses[i]`, and, when `details` is not NULL, its details
// in `details[i]`. A failing event does not stop the batch; the call itself fails only
// for bad arguments (then nothing ran).
int32_t gmem_vm_apply(struct gmem_vm *vm,
                      const struct gmem_event *events,
                      size_t n,
                      int32_t *statuses,
                      struct gmem_detail *details);

// The VM's counter `index` (0, 1, ... until `-ENOENT`): its name (a static string) in
// `*name` and value in `*value` (either may be NULL). The counters and their order are
// those of Python's `vm.stats()`; new counters may be added, so iterate or ask by name.
int32_t gmem_vm_stat(struct gmem_vm *vm, size_t index, const char **name, uint64_t *value);

// The VM's counter called `name` in `*value`; `-ENOENT` if there is none.
int32_t gmem_vm_stat_get(struct gmem_vm *vm, const char *name, uint64_t *value);

// Check every invariant of the VM; `-EUCLEAN` names the broken one in
// `gmem_last_error()`.
int32_t gmem_vm_check(struct gmem_vm *vm);

// `fallocate(mode, offset, length)` on a guest_memfd (`FALLOC_FL_*` modes).
int32_t gmem_guest_memfd_fallocate(struct gmem_guest_memfd *file,
                                   uint32_t mode,
                                   uint64_t offset,
                                   uint64_t length);

// `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd (in-place designs) over
// `[offset, offset + size)`. A conversion refused for an elevated page reference is
// `-EAGAIN` with the offending file offset in `*error_offset` (when not NULL).
int32_t gmem_guest_memfd_set_memory_attributes2(struct gmem_guest_memfd *file,
                                                uint64_t offset,
                                                uint64_t size,
                                                uint64_t attributes,
                                                uint64_t flags,
                                                uint64_t *error_offset);

// `mmap()` of a guest_memfd from `offset`, `*length` bytes (NULL: to the end of the
// file), `MAP_SHARED` when `shared` (else `MAP_PRIVATE`).
int32_t gmem_guest_memfd_mmap(struct gmem_guest_memfd *file,
                              uint64_t offset,
                              const uint64_t *length,
                              bool shared,
                              struct gmem_mapping **out);

// `memory_failure()` on the page at byte `offset` of the guest_memfd (mainline
// `kvm_gmem_error_folio()`): its stage-2 and host mappings go, the page stays poisoned
// in the file until its hole is punched. Later guest accesses fail with `-EHWPOISON`
// (133), host accesses through a mapping with `-EFAULT` (SIGBUS). `-EINVAL` for an
// unaligned offset or one beyond the size, `-ENOENT` where no page is present (a
// released file has none), `-EHWPOISON` for a page already poisoned.
int32_t gmem_guest_memfd_memory_failure(struct gmem_guest_memfd *file, uint64_t offset);

// `close()` the guest_memfd's fd (the handle stays valid; later calls on it are
// `-EBADF` as the kernel's would be).
int32_t gmem_guest_memfd_close(struct gmem_guest_memfd *file);

// The mapping's start address (what a memslot's `userspace_addr` takes) in `*addr`.
int32_t gmem_mapping_addr(struct gmem_mapping *mapping, uint64_t *addr);

// A host read of the page at `offset` in the mapping: its value in `*value` (when not
// NULL). A page the host may not touch is `-EFAULT` (SIGBUS in the kernel).
int32_t gmem_mapping_read(struct gmem_mapping *mapping, uint64_t offset, uint64_t *value);

// A host write of `value` to the page at `offset` in the mapping.
int32_t gmem_mapping_write(struct gmem_mapping *mapping, uint64_t offset, uint64_t value);

// Pin the page at `offset` (`get_user_pages(FOLL_PIN)`).
int32_t gmem_mapping_pin(struct gmem_mapping *mapping, uint64_t offset);

// Drop one pin of the page at `offset`.
int32_t gmem_mapping_unpin(struct gmem_mapping *mapping, uint64_t offset);

// `madvise(MADV_DONTNEED)` over `[offset, offset + length)` of the mapping.
int32_t gmem_mapping_discard(struct gmem_mapping *mapping, uint64_t offset, uint64_t length);

// `mbind()` over `[offset, offset + length)` of the mapping: policy `mode` (`MPOL_*`)
// over the nodes of `nodemask` (bit `n`: node `n`). On a guest_memfd mapping the policy
// is the file's; it places pages allocated later. Errors as mbind(2): an unknown mode,
// an unaligned offset, an empty or host-less node set for a mode that needs nodes is
// `-EINVAL`; a range past the mapping `-EFAULT`.
int32_t gmem_mapping_mbind(struct gmem_mapping *mapping,
                           uint64_t offset,
                           uint64_t length,
                           uint32_t mode,
                           uint64_t nodemask);

// `get_mempolicy(MPOL_F_ADDR)` for the page at `offset`: its mode in `*mode` and nodes
// in `*nodemask` (either may be NULL); `MPOL_DEFAULT` and 0 where no policy is set.
int32_t gmem_mapping_get_mempolicy(struct gmem_mapping *mapping,
                                   uint64_t offset,
                                   uint32_t *mode,
                                   uint64_t *nodemask);

// The NUMA node of the page mapped at `offset` in `*node` (`move_pages()` status);
// `-ENOENT` when none is mapped there.
int32_t gmem_mapping_page_node(struct gmem_mapping *mapping, uint64_t offset, uint32_t *node);

// `munmap()` the mapping (the handle stays valid; later accesses fail as the kernel's).
int32_t gmem_mapping_unmap(struct gmem_mapping *mapping);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* GMEM_H */
