/* leafcost MODE N WORKER [CGROUP_DIR] -- what the kernel's part of "every worker in its own
 * cgroup leaf" costs, without any supervisor logic: N children started one after the other
 * with clone3(CLONE_VFORK) (returns once the child has exec'd) and execv(WORKER), then all
 * SIGKILLed, reaped and started again (a mass crash). MODE:
 *   plain  no cgroup: the floor;
 *   leaf   each child born in a leaf of its own (mkdir CGROUP_DIR/w-<i>, open O_PATH,
 *          CLONE_INTO_CGROUP), a new leaf for each restart (the old one removed after the
 *          timed part, as Hatchery removes retired leaves off the hot path);
 *   setsid as leaf, and the child calls setsid() before execv (Hatchery's workers led
 *          their own session until 2026-12-07);
 *   premade as leaf, but every leaf is made (and opened) before the timed parts: what
 *          CLONE_INTO_CGROUP into a leaf costs without its mkdir;
 *   reuse  as leaf, but each restart is born in the leaf of the child it replaces (empty
 *          once that child exited), as Hatchery replaces a crashed worker.
 * Prints one JSON object. Build: cc -O2 -o leafcost bench/leafcost.c */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static char *wargv[2];
static int with_leaf, with_setsid, premade, reuse;
static int *leaf_fds[2];
static const char *base;

static void leaf_path(char *buf, size_t len, int i, int round) {
    snprintf(buf, len, "%s/w-%d.%d", base, i, round);
}

static pid_t start(int i, int round) {
    struct clone_args a;
    memset(&a, 0, sizeof a);
    /* The fd table shared, the child's first act unsharing it with only 0-2 (as Hatchery
     * does): a copy of the parent's table (10,000 leaf fds in premade mode) is not what
     * is measured. */
    a.flags = CLONE_VFORK | CLONE_FILES;
    a.exit_signal = SIGCHLD;
    int fd = -1;
    if (premade) {
        fd = leaf_fds[round][i];
        a.flags |= CLONE_INTO_CGROUP;
        a.cgroup = (uint64_t)fd;
    } else if (with_leaf) {
        char p[4096];
        leaf_path(p, sizeof p, i, reuse ? 0 : round);
        if (mkdir(p, 0755) && errno != EEXIST) { perror(p); exit(1); }
        fd = open(p, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) { perror(p); exit(1); }
        a.flags |= CLONE_INTO_CGROUP;
        a.cgroup = (uint64_t)fd;
    }
    long pid = syscall(SYS_clone3, &a, sizeof a);
    if (pid == 0) {
        if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_UNSHARE)) _exit(126);
        if (with_setsid) setsid();
        execv(wargv[0], wargv);
        _exit(127);
    }
    if (pid < 0) { perror("clone3"); exit(1); }
    if (fd >= 0 && !premade) close(fd);
    return (pid_t)pid;
}

/* Opens the premade leaves of `round` (one round at a time: 10,000 fds each). */
static void open_leaves(int n, int round) {
    char p[4096];
    for (int i = 0; i < n; i++) {
        leaf_path(p, sizeof p, i, round);
        leaf_fds[round][i] = open(p, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (leaf_fds[round][i] < 0) { perror(p); exit(1); }
    }
}

static void remove_leaves(int n, int round) {
    char p[4096];
    for (int i = 0; i < n; i++) {
        leaf_path(p, sizeof p, i, round);
        rmdir(p);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: leafcost plain|leaf|setsid|premade|reuse N WORKER [CGROUP_DIR]\n"); return 2; }
    with_leaf = strcmp(argv[1], "plain") != 0;
    with_setsid = strcmp(argv[1], "setsid") == 0;
    premade = strcmp(argv[1], "premade") == 0;
    reuse = strcmp(argv[1], "reuse") == 0;
    int n = atoi(argv[2]);
    wargv[0] = argv[3];
    wargv[1] = NULL;
    base = argc > 4 ? argv[4] : NULL;
    if (with_leaf && !base) { fprintf(stderr, "leaf, setsid, premade and reuse need CGROUP_DIR\n"); return 2; }
    pid_t *k = calloc(n, sizeof *k);
    if (premade) {
        char p[4096];
        for (int r = 0; r < 2; r++) {
            leaf_fds[r] = calloc(n, sizeof(int));
            for (int i = 0; i < n; i++) {
                leaf_path(p, sizeof p, i, r);
                if (mkdir(p, 0755) && errno != EEXIST) { perror(p); exit(1); }
            }
        }
        open_leaves(n, 0);
    }
    double t0 = now();
    for (int i = 0; i < n; i++) k[i] = start(i, 0);
    double cold = now() - t0;
    if (premade) {
        for (int i = 0; i < n; i++) close(leaf_fds[0][i]);
        open_leaves(n, 1);
    }
    usleep(500000);
    t0 = now();
    for (int i = 0; i < n; i++) kill(k[i], SIGKILL);
    for (int i = 0; i < n; i++) {
        waitpid(k[i], NULL, 0);
        k[i] = start(i, 1);
    }
    double mass = now() - t0;
    for (int i = 0; i < n; i++) kill(k[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(k[i], NULL, 0);
    if (with_leaf) {
        remove_leaves(n, 0);
        remove_leaves(n, 1);
    }
    printf("{\"mode\": \"%s\", \"n\": %d, \"cold_start_s\": %.4f, \"mass_crash_s\": %.4f}\n",
           argv[1], n, cold, mass);
    return 0;
}
