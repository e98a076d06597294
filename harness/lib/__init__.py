"""What a test needs on top of the binding (harness.kvm, which never imports this package):
guest ELF images (guest), the ucall protocol (ucall), guest failures (failures), the run loop
(run), GuestVm / GuestVcpu / vm_with_vcpus (guestvm) and a guest driver's descriptor (mailbox)."""
