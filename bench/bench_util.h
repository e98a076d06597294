/* What every C baseline in bench/ needs: fail loudly with errno, checked ioctls, a monotonic clock
 * (the one the Python side times with). Each program defines BENCH_PROG before including this. */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

static void die(const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", BENCH_PROG, what, strerror(errno));
	exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	int rc = ioctl(fd, req, arg);
	if (rc < 0)
		die(what);
	return rc;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
