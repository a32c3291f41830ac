/* vmalb-probe: the test guest's write workload and latency probe (scripts/build-guest).
 *
 * vmalb-probe DEVICE FIRST_BLOCK BLOCKS INTERVAL_US
 *
 * Writes 4 KiB blocks with O_DIRECT at random offsets of DEVICE's blocks
 * FIRST_BLOCK .. FIRST_BLOCK + BLOCKS - 1, sleeping INTERVAL_US between writes, and
 * times each pwrite with CLOCK_MONOTONIC. Prints "vmalb: probe N" (writes so far) once a
 * second; on SIGUSR1, "vmalb: lat n=.. p50=.. p99=.. max=.." in microseconds over the
 * writes since the previous report. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 1000000
static unsigned samples[MAX_SAMPLES];
static volatile sig_atomic_t want_report;

static void on_usr1(int sig) { (void)sig; want_report = 1; }

static int cmp(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}

static void report(size_t n) {
    if (n == 0) {
        printf("vmalb: lat n=0\n");
    } else {
        qsort(samples, n, sizeof samples[0], cmp);
        printf("vmalb: lat n=%zu p50=%u p99=%u max=%u\n", n, samples[n / 2],
               samples[(n * 99) / 100], samples[n - 1]);
    }
    fflush(stdout);
}

static long long us_between(const struct timespec *a, const struct timespec *b) {
    return (b->tv_sec - a->tv_sec) * 1000000LL + (b->tv_nsec - a->tv_nsec) / 1000;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: vmalb-probe DEVICE FIRST_BLOCK BLOCKS INTERVAL_US\n");
        return 2;
    }
    long long first = atoll(argv[2]), blocks = atoll(argv[3]);
    long interval = atol(argv[4]);
    if (blocks <= 0) {
        fprintf(stderr, "vmalb-probe: BLOCKS must be positive\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, 4096) != 0) {
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    unsigned seed = 16;
    unsigned long long total = 0;
    size_t n = 0;
    struct timespec t0, t1, last;
    clock_gettime(CLOCK_MONOTONIC, &last);
    for (;;) {
        long long blk = first + (long long)(rand_r(&seed) % (unsigned long long)blocks);
        memset(buf, (int)(total & 0xff), 4096);
        snprintf(buf, 64, "probe %llu", total);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (pwrite(fd, buf, 4096, blk * 4096) != 4096) {
            perror("vmalb-probe: pwrite");
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (n < MAX_SAMPLES) {
            samples[n++] = (unsigned)us_between(&t0, &t1);
        }
        total++;
        if (t1.tv_sec != last.tv_sec) {
            printf("vmalb: probe %llu\n", total);
            fflush(stdout);
            last = t1;
        }
        if (want_report) {
            want_report = 0;
            report(n);
            n = 0;
        }
        if (interval > 0) {
            usleep((useconds_t)interval);
        }
    }
}
