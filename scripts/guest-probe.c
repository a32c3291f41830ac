/* vmalb-probe: the test guest's write workload and latency probe (scripts/build-guest).
 *
 * vmalb-probe DEVICE FIRST_BLOCK BLOCKS INTERVAL_US
 *
 * Writes 4 KiB blocks with O_DIRECT at random offsets of DEVICE's blocks
 * FIRST_BLOCK .. FIRST_BLOCK + BLOCKS - 1, sleeping INTERVAL_US between writes, and
 * times each pwrite with CLOCK_MONOTONIC. Write number N (counted from 0) fills its block
 * with N's low byte after the text "probe N", so a copy of the disk tells which writes it
 * holds. Prints "vmalb: probe N" (writes so far) once a second. On SIGUSR1 it reports the
 * writes since the previous report: first each write as "T,B,L" (hex: its start in µs
 * since the probe started, its block, its time in µs), 16 to a "vmalb: w ..." line, then
 * "vmalb: lat n=.. first=.. p50=.. p99=.. max=.." (µs; first: the number of the first
 * of those writes). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 400000
static unsigned samples[MAX_SAMPLES], sorted[MAX_SAMPLES], blocks_of[MAX_SAMPLES];
static unsigned long long starts[MAX_SAMPLES];
static volatile sig_atomic_t want_report;

static void on_usr1(int sig) { (void)sig; want_report = 1; }

static int cmp(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}

static void report(size_t n, unsigned long long first) {
    for (size_t i = 0; i < n; i++) {
        printf("%s%llx,%x,%x", i % 16 == 0 ? "vmalb: w " : " ", starts[i], blocks_of[i],
               samples[i]);
        if (i % 16 == 15 || i == n - 1) {
            printf("\n");
        }
    }
    if (n == 0) {
        printf("vmalb: lat n=0 first=%llu\n", first);
    } else {
        memcpy(sorted, samples, n * sizeof samples[0]);
        qsort(sorted, n, sizeof sorted[0], cmp);
        printf("vmalb: lat n=%zu first=%llu p50=%u p99=%u max=%u\n", n, first, sorted[n / 2],
               sorted[(n * 99) / 100], sorted[n - 1]);
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
    unsigned long long total = 0, reported = 0;
    size_t n = 0;
    struct timespec t0, t1, last, origin;
    clock_gettime(CLOCK_MONOTONIC, &last);
    origin = last;
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
            starts[n] = (unsigned long long)us_between(&origin, &t0);
            blocks_of[n] = (unsigned)blk;
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
            if (total - reported > n) {
                printf("vmalb: FATAL probe: %llu writes since the last report, %zu kept\n",
                       total - reported, n);
                fflush(stdout);
            }
            report(n, reported);
            n = 0;
            reported = total;
        }
        if (interval > 0) {
            usleep((useconds_t)interval);
        }
    }
}
