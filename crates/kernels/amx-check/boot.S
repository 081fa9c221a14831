/* amx-check's boot: a BIOS boot sector that reads the check program from the disk to 0x10000,
   builds identity page tables for the first GiB (2 MiB pages), enters 64-bit long mode and
   jumps to it; then the program's entry enables the x87, SSE, AVX-512 and AMX state in XCR0,
   sets a stack and calls `check_main`, whose report leaves through Bochs' port 0xE9. */

    .section .boot, "ax"
    .code16
    .globl boot
boot:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    /* Read 512 sectors (256 KiB) from LBA 1 to 0x10000, 64 at a time (BIOS extended read). */
    movw $1, lba
    movw $0x1000, dap_segment
    mov $8, %cx
1:  push %cx
    mov $dap, %si
    mov $0x42, %ah
    int $0x13
    jc disk_error
    addw $64, lba
    addw $0x800, dap_segment
    pop %cx
    loop 1b
    /* The BIOS may have enabled interrupts; there is no IDT for them in long mode. */
    cli
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1

    /* Page tables: PML4 at 0x1000, PDPT at 0x2000, 512 2 MiB pages at 0x3000. */
    mov $0x1000, %di
    mov $0x3000, %cx
    xor %ax, %ax
    rep stosw
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    mov $0x3000, %di
    mov $0x83, %eax          /* present, writable, 2 MiB page */
    mov $512, %cx
2:  mov %eax, (%di)
    add $0x200000, %eax
    add $8, %di
    loop 2b

    lgdt gdt_pointer
    mov %cr4, %eax
    or $((1 << 5) | (1 << 9) | (1 << 10) | (1 << 18)), %eax  /* PAE, OSFXSR, OSXMMEXCPT, OSXSAVE */
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx    /* EFER: long mode enable */
    rdmsr
    or $(1 << 8), %eax
    wrmsr
    mov %cr0, %eax
    and $~(1 << 2), %eax     /* no x87 emulation */
    or $((1 << 31) | (1 << 1) | 1), %eax   /* paging, MP, protection */
    mov %eax, %cr0
    ljmpl $0x08, $0x10000

disk_error:
    mov $'D', %al
    out %al, $0xe9
    hlt

    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9a000000ffff  /* 64-bit code */
    .quad 0x00cf92000000ffff  /* data */
gdt_pointer:
    .word gdt_pointer - gdt - 1
    .long gdt

dap:
    .byte 16, 0
    .word 64
    .word 0
dap_segment:
    .word 0
lba:
    .quad 0

    .org 510
    .byte 0x55, 0xaa

    .section .entry, "ax"
    .code64
    .globl entry
entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x80000, %rsp
    xor %ecx, %ecx
    mov $0xe7, %eax          /* x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM */
    mov $0x6, %edx           /* XTILECFG, XTILEDATA: bits 17 and 18 */
    shl $16, %edx
    or %edx, %eax
    xor %edx, %edx
    xsetbv
    call check_main
    mov $0x8900, %dx         /* Bochs' shutdown port */
    mov $shutdown, %rsi
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  cli
    hlt
    jmp 4b
shutdown:
    .asciz "Shutdown"

    .section .note.GNU-stack, "", @progbits
