/* System calls behind the IMA hooks that FUSE cannot see, one per verb,
 * for tests/test_supervise.py.  Prints "ok" or "errno=N" and exits 0 either
 * way: the test checks what the emulated kernel recorded and what the call
 * returned. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

static int report(long rc)
{
	if (rc < 0)
		printf("errno=%d\n", errno);
	else
		printf("ok\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	const char *verb = argv[1];
	if (!strcmp(verb, "mmap") || !strcmp(verb, "mmap-loop")) {	/* FILE [COUNT] */
		int n = argc > 3 ? atoi(argv[3]) : 1;
		for (int i = 0; i < n; i++) {
			int fd = open(argv[2], O_RDONLY);
			if (fd < 0)
				return report(-1);
			void *p = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
			if (p == MAP_FAILED)
				return report(-1);
			munmap(p, 4096);
			close(fd);
		}
		return report(0);
	}
	if (!strcmp(verb, "mprotect")) {	/* FILE: mapped read-only, then made executable */
		int fd = open(argv[2], O_RDONLY);
		void *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED)
			return report(-1);
		return report(mprotect(p, 4096, PROT_READ | PROT_EXEC));
	}
	if (!strcmp(verb, "mprotect-anon")) {	/* anonymous memory made executable (a JIT) */
		void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		return report(mprotect(p, 4096, PROT_READ | PROT_EXEC));
	}
	if (!strcmp(verb, "mprotect-unaligned")) {	/* FILE: EINVAL before any hook */
		int fd = open(argv[2], O_RDONLY);
		char *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
		return report(mprotect(p + 1, 4095, PROT_READ | PROT_EXEC));
	}
	if (!strcmp(verb, "mprotect-hole")) {	/* FILE: a hole before the file mapping: ENOMEM, no hook */
		int fd = open(argv[2], O_RDONLY);
		char *p = mmap(NULL, 3 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		munmap(p, 4096);
		mmap(p + 4096, 4096, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
		return report(mprotect(p, 2 * 4096, PROT_READ | PROT_EXEC));
	}
	if (!strcmp(verb, "finit_module")) {	/* FILE */
		int fd = open(argv[2], O_RDONLY);
		return report(syscall(SYS_finit_module, fd, "", 0));
	}
	if (!strcmp(verb, "kexec_file_load")) {	/* KERNEL INITRD CMDLINE */
		int k = open(argv[2], O_RDONLY), i = open(argv[3], O_RDONLY);
		return report(syscall(SYS_kexec_file_load, k, i, strlen(argv[4]) + 1, argv[4], 0UL));
	}
	if (!strcmp(verb, "add_key-bad"))	/* a type pointer to nowhere */
		return report(syscall(SYS_add_key, (void *)8, "", "x", 1, -3));
	if (!strcmp(verb, "add_key-huge"))	/* a payload length past the kernel's limit */
		return report(syscall(SYS_add_key, "asymmetric", "", "x", 1UL << 40, -3));
	if (!strcmp(verb, "add_key-badpayload"))	/* RING: a payload pointer to nowhere */
		return report(syscall(SYS_add_key, "asymmetric", "", (void *)8, 100UL, atol(argv[2])));
	if (!strcmp(verb, "describe-bad"))	/* SERIAL: a buffer pointer to nowhere */
		return report(syscall(SYS_keyctl, 6, atol(argv[2]), (void *)8, 4096UL));
	if (!strcmp(verb, "request_key-bad"))	/* a description pointer to nowhere */
		return report(syscall(SYS_request_key, "keyring", (void *)8, NULL, 0));
	if (!strcmp(verb, "kexec-bad-cmdline")) {	/* KERNEL: a command line pointer to nowhere */
		int k = open(argv[2], O_RDONLY);
		return report(syscall(SYS_kexec_file_load, k, -1, 100UL, (void *)8, 4UL));
	}
	if (!strcmp(verb, "mmap-opath")) {	/* FILE opened O_PATH: EBADF before any hook */
		int fd = open(argv[2], O_PATH);
		return report((long)mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == -1 ? -1 : 0);
	}
	if (!strcmp(verb, "uname-bad"))		/* a pointer to nowhere */
		return report(syscall(SYS_uname, (void *)8));
	if (!strcmp(verb, "bogus-mmap"))	/* a descriptor that is not open */
		return report((long)mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, 999, 0) == -1 ? -1 : 0);
	if (!strcmp(verb, "loop")) {		/* COUNT unstopped calls and stopped unames */
		struct utsname u;
		int n = atoi(argv[2]);
		for (int i = 0; i < n; i++) {
			syscall(SYS_getpid);
			uname(&u);
		}
		printf("%s\n", u.release);
		return 0;
	}
	return 2;
}
