"""What a test needs on top of the binding: guest ELF images, ucall, the run loop, guest VMs."""
