/* The README's Python example ("Use it"), in C against include/gmem.h and libgmem,
 * followed by one batch of events; then every counter of the VM.
 *
 * Build: make c-example (or: cc -Wall -Werror -Iinclude examples/c/example.c
 *        target/release/libgmem.a -lpthread -ldl -lm)
 * Output: the README's two lines (the fault exit; rmpupdates), the batch's statuses,
 * then "name value" per counter. tests/test_embedding.py compares it with Python's.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "gmem.h"

/* Stop on a failed call, naming it and gmem's message. */
#define TRY(call)                                                                      \
    do {                                                                               \
        int32_t rc_ = (call);                                                          \
        if (rc_ != 0) {                                                                \
            fprintf(stderr, "%s: %d (%s)\n", #call, rc_, gmem_last_error());           \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

_Static_assert(sizeof(gmem_event) == 25, "gmem_event is an EVENT_DTYPE record");

int main(void)
{
    gmem_host *host;
    gmem_vm *vm;
    gmem_guest_memfd *fd;
    gmem_mapping *shared;
    uint64_t shared_addr, value;
    gmem_memory_fault fault;
    int32_t rc;

    TRY(gmem_host_new(1ull << 30, NULL, 0, &host));
    TRY(gmem_host_create_vm(host, "snp", "dual", &vm));
    TRY(gmem_vm_create_guest_memfd(vm, 64ull << 20, 0, 0, &fd));
    TRY(gmem_host_mmap_anonymous(host, 64ull << 20, &shared));
    TRY(gmem_mapping_addr(shared, &shared_addr));
    TRY(gmem_vm_set_user_memory_region2(vm, 0, GMEM_KVM_MEM_GUEST_MEMFD, 0, 64ull << 20,
                                        shared_addr, fd, 0, NULL, NULL));
    TRY(gmem_vm_set_memory_attributes(vm, 0, 2ull << 20, GMEM_KVM_MEMORY_ATTRIBUTE_PRIVATE, 0));
    TRY(gmem_vm_guest_write(vm, 0x1000, 42, true, NULL));

    rc = gmem_vm_guest_read(vm, 0x1000, false, &value, &fault);
    if (rc != -EFAULT) {
        fprintf(stderr, "expected a memory fault, got %d\n", rc);
        return 1;
    }
    printf("0x%" PRIx64 " %" PRIu64 " %" PRIu64 "\n", fault.gpa, fault.size, fault.flags);
    TRY(gmem_vm_check(vm));
    TRY(gmem_vm_stat_get(vm, "rmpupdates", &value));
    printf("%" PRIu64 "\n", value);

    /* One batch: share 16 pages, write and read them, a private read that faults, and
     * convert them back. */
    gmem_event events[] = {
        {GMEM_OP_CONVERT_SHARED, 0, 16, 0},
        {GMEM_OP_GUEST_WRITE_SHARED, 1, 1, 7},
        {GMEM_OP_GUEST_READ_SHARED, 1, 1, 0},
        {GMEM_OP_GUEST_READ_PRIVATE, 2, 1, 0},
        {GMEM_OP_CONVERT_PRIVATE, 0, 16, 0},
        {GMEM_OP_GUEST_READ_PRIVATE, 1, 1, 0},
    };
    enum { N = sizeof events / sizeof events[0] };
    int32_t status[N];
    gmem_detail details[N];
    TRY(gmem_vm_apply(vm, events, N, status, details));
    printf("status");
    for (int i = 0; i < N; i++)
        printf(" %" PRId32, status[i]);
    printf("\nvalues");
    for (int i = 0; i < N; i++)
        printf(" %" PRIu64, details[i].value);
    printf("\n");
    TRY(gmem_host_check(host));

    const char *name;
    for (size_t i = 0; gmem_vm_stat(vm, i, &name, &value) == 0; i++)
        printf("%s %" PRIu64 "\n", name, value);

    TRY(gmem_host_free(host));
    /* Every handle of the host is gone with it: an error, not a crash. */
    rc = gmem_vm_check(vm);
    if (rc != -EBADF) {
        fprintf(stderr, "a freed handle gave %d, not -EBADF\n", rc);
        return 1;
    }
    return 0;
}
