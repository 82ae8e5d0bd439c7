/* Per-call cost of system calls, for scripts/bench.py's "hooks" section:
 * run once bare and once under imafs's seccomp filter.  Prints JSON:
 * nanoseconds per call of each loop.
 *   hookbench N FILE_OUTSIDE FILE_MEASURED FILE_ASKED */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

#define LOOP(name, n, body) do { \
	double t0 = now(); \
	for (long i = 0; i < (n); i++) { body; } \
	printf("%s\"%s\": %.1f", first ? "" : ", ", name, (now() - t0) / (n)); \
	first = 0; \
} while (0)

int main(int argc, char **argv)
{
	long n = atol(argv[1]), stopped = n / 100 ? n / 100 : 1;
	int first = 1, zero = open("/dev/zero", O_RDONLY);
	int outside = open(argv[2], O_RDONLY), measured = open(argv[3], O_RDONLY), asked = open(argv[4], O_RDONLY);
	char c;
	struct utsname u;
	void *p;

	printf("{");
	LOOP("getpid", n, syscall(SYS_getpid));
	LOOP("read_1_byte", n, read(zero, &c, 1));
	LOOP("mmap_anon_rw_munmap", n, p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); munmap(p, 4096));
	LOOP("mmap_file_read_munmap", n, p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, outside, 0); munmap(p, 4096));
	LOOP("uname", stopped, uname(&u));
	LOOP("mmap_exec_outside_munmap", stopped, p = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, outside, 0); munmap(p, 4096));
	LOOP("mmap_exec_measured_munmap", stopped, p = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, measured, 0); munmap(p, 4096));
	LOOP("mmap_exec_asked_munmap", stopped, p = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, asked, 0); munmap(p, 4096));
	printf("}\n");
	return 0;
}
