/*
 * LD_PRELOAD stand-in for /dev/kmsg, for end-to-end tests of the kernel-log oracle: user space cannot
 * log a kernel (facility 0) record, so a test that wants a kernel WARN "during a case" needs a fake.
 *
 * open("/dev/kmsg") opens the spool file named by $FAKE_KMSG_SPOOL instead; read() on that fd returns
 * one record per call as /dev/kmsg does ("pri,seq,ts,flags;text\n" plus " KEY=value\n" continuation
 * lines), or EAGAIN when no whole record is there yet; lseek(SEEK_END) works as on the real device
 * (the spool is a plain file). Tests append records to the spool; every process of the run sees them,
 * as every process sees the machine-wide kernel log.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_FD 4096
static unsigned char fake[MAX_FD];

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static ssize_t (*real_read)(int, void *, size_t);
static int (*real_close)(int);

static void init(void)
{
	if (!real_read) {
		real_open = dlsym(RTLD_NEXT, "open");
		real_openat = dlsym(RTLD_NEXT, "openat");
		real_read = dlsym(RTLD_NEXT, "read");
		real_close = dlsym(RTLD_NEXT, "close");
	}
}

static int open_spool(int flags)
{
	const char *spool = getenv("FAKE_KMSG_SPOOL");
	int fd;

	if (!spool) {
		errno = ENOENT;
		return -1;
	}
	fd = real_open(spool, O_RDONLY | (flags & (O_NONBLOCK | O_CLOEXEC)));
	if (fd >= 0 && fd < MAX_FD)
		fake[fd] = 1;
	return fd;
}

static int is_kmsg(const char *path)
{
	return path && strcmp(path, "/dev/kmsg") == 0;
}

int open(const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	va_start(ap, flags);
	mode = va_arg(ap, mode_t);
	va_end(ap);
	return openat(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...) __attribute__((alias("open")));

int openat(int dirfd, const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	init();
	va_start(ap, flags);
	mode = va_arg(ap, mode_t);
	va_end(ap);
	if (is_kmsg(path) && (flags & O_ACCMODE) == O_RDONLY)
		return open_spool(flags);
	return real_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

ssize_t read(int fd, void *buf, size_t count)
{
	char tmp[65536];
	off_t pos;
	ssize_t n, i, len = -1;

	init();
	if (fd < 0 || fd >= MAX_FD || !fake[fd])
		return real_read(fd, buf, count);
	pos = lseek(fd, 0, SEEK_CUR);
	n = pread(fd, tmp, sizeof(tmp), pos);
	if (n < 0)
		return -1;
	/* a record ends at a newline not followed by a continuation line (" KEY=value") */
	for (i = 0; i < n; i++) {
		if (tmp[i] == '\n' && (i + 1 == n || tmp[i + 1] != ' ')) {
			len = i + 1;
			break;
		}
	}
	if (len < 0) {
		errno = EAGAIN;
		return -1;
	}
	if ((size_t)len > count) {
		errno = EINVAL; /* as /dev/kmsg: the buffer must hold one whole record */
		return -1;
	}
	memcpy(buf, tmp, len);
	lseek(fd, pos + len, SEEK_SET);
	return len;
}

int close(int fd)
{
	init();
	if (fd >= 0 && fd < MAX_FD)
		fake[fd] = 0;
	return real_close(fd);
}
