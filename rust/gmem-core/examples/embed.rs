//! The README's example ("Use it") driven from Rust, followed by one batch of events:
//! what a Rust simulator embedding `gmem-core` does. Output as `examples/c/example.c`'s.
//!
//! Run: `cargo run -p gmem-core --example embed`

use gmem_core::uapi::{KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE};
use gmem_core::{Error, GmemArg, Host, MemRegion, Op, StrategyKind, VmType};

fn main() -> gmem_core::Result<()> {
    let mut host = Host::new(1 << 30)?;
    let vm = host.create_vm(VmType::Snp, StrategyKind::Dual);
    let file = host.create_guest_memfd(vm, 64 << 20, 0, 0)?;
    let shared = host.mmap_anonymous(64 << 20)?;
    let fd = host.file(file).fd().expect("a new guest_memfd is open");
    host.set_user_memory_region2(
        vm,
        MemRegion {
            slot: 0,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0,
            memory_size: 64 << 20,
            userspace_addr: host.mapping(shared).addr,
            guest_memfd: GmemArg::Fd(fd.into()),
            guest_memfd_offset: 0,
            shared_guest_memfd: GmemArg::None,
            shared_offset: None,
        },
    )?;
    host.set_memory_attributes(vm, 0, 2 << 20, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)?;
    host.guest_access(vm, 0x1000, true, Some(42))?;
    // KVM_EXIT_MEMORY_FAULT: a shared access to a private page exits to the VMM.
    match host.guest_access(vm, 0x1000, false, None) {
        Err(Error::MemoryFault { gpa, size, flags }) => println!("{gpa:#x} {size} {flags}"),
        other => panic!("expected a memory fault, got {other:?}"),
    }
    host.check_vm(vm)?;
    println!("{}", host.stats(vm).rmpupdates);

    // One batch: columns of op, first gfn, pages, value; one status per event.
    let ops = [
        Op::ConvertShared,
        Op::GuestWriteShared,
        Op::GuestReadShared,
        Op::GuestReadPrivate,
        Op::ConvertPrivate,
        Op::GuestReadPrivate,
    ]
    .map(|op| op as u8);
    let mut details = Vec::new();
    let status = host.apply(
        vm,
        &ops,
        &[0, 1, 1, 2, 0, 1],
        &[16, 1, 1, 1, 16, 1],
        &[0, 7, 0, 0, 0, 0],
        Some(&mut details),
    )?;
    let join = |v: Vec<String>| v.join(" ");
    println!(
        "status {}",
        join(status.iter().map(i32::to_string).collect())
    );
    println!(
        "values {}",
        join(details.iter().map(|d| d.value.to_string()).collect())
    );
    host.check()?;
    for (name, value) in host.stats(vm).items() {
        println!("{name} {value}");
    }
    println!("attr_intervals {}", host.attr_intervals(vm));
    Ok(())
}
