/* limitleaf CGROUP_DIR N cmd [args...] -- the shared harness's limitsup (the smallest
 * sensible supervisor: start N children, block in waitpid(), start a dead child again at
 * once) with one thing added: each child born in a cgroup leaf of its own, a new leaf for
 * each start (mkdir CGROUP_DIR/w-<i>.<k>, clone3(CLONE_INTO_CGROUP)), as Hatchery does. The
 * floor for a supervisor that keeps every worker in its own leaf. The old leaves are removed
 * when there is nothing to reap (Hatchery too removes them off the hot path). Children
 * start with clone3(CLONE_VFORK | CLONE_FILES) (returns once the child has exec'd), the
 * child's first act unsharing the fd table with only fds 0-2 (as Hatchery's do).
 * SIGTERM: send SIGTERM to every child, reap them all, remove every leaf and CGROUP_DIR,
 * exit 0. With LIMITLEAF_SETSID=1 in its environment each child also calls setsid() before
 * its execv (a session, and so a scheduler autogroup, of its own, as Hatchery's workers had
 * until 2026-12-07).
 * Build: cc -O2 -o limitleaf bench/limitleaf.c */
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
#include <unistd.h>

static volatile sig_atomic_t stopping;
static void on_term(int s) { (void)s; stopping = 1; }

static const char *base;
static int own_session;     /* LIMITLEAF_SETSID=1: each child calls setsid() (Hatchery's did until 2026-12-07) */
static char **cmd;
static int n;
static pid_t *kids;
static unsigned *round_of;  /* the leaf w-<i>.<round_of[i]> holds child i */
static int *retired;        /* leaves to remove: child i's round - 1, or -1 */

static void leaf_path(char *buf, size_t len, int i, unsigned round) {
    snprintf(buf, len, "%s/w-%d.%u", base, i, round);
}

static pid_t spawn1(int i) {
    char p[4096];
    leaf_path(p, sizeof p, i, round_of[i]);
    if (mkdir(p, 0755) && errno != EEXIST) { perror(p); return 0; }
    int fd = open(p, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) { perror(p); return 0; }
    struct clone_args a;
    memset(&a, 0, sizeof a);
    a.flags = CLONE_VFORK | CLONE_FILES | CLONE_INTO_CGROUP;
    a.exit_signal = SIGCHLD;
    a.cgroup = (uint64_t)fd;
    long pid = syscall(SYS_clone3, &a, sizeof a);
    if (pid == 0) {
        if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_UNSHARE)) _exit(126);
        struct sigaction dfl = {0};
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGTERM, &dfl, NULL);
        sigaction(SIGINT, &dfl, NULL);
        if (own_session && setsid() < 0) _exit(125);
        execv(cmd[0], cmd);
        _exit(127);
    }
    close(fd);
    if (pid < 0) { perror("clone3"); return 0; }
    return (pid_t)pid;
}

static void remove_retired(void) {
    char p[4096];
    for (int i = 0; i < n; i++)
        if (retired[i] >= 0) {
            leaf_path(p, sizeof p, i, (unsigned)retired[i]);
            rmdir(p);
            retired[i] = -1;
        }
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: limitleaf CGROUP_DIR N cmd [args...]\n"); return 100; }
    base = argv[1];
    const char *sid = getenv("LIMITLEAF_SETSID");
    own_session = sid != NULL && strcmp(sid, "1") == 0;
    n = atoi(argv[2]);
    cmd = argv + 3;
    if (mkdir(base, 0755) && errno != EEXIST) { perror(base); return 1; }
    kids = calloc(n, sizeof *kids);
    round_of = calloc(n, sizeof *round_of);
    retired = malloc(n * sizeof *retired);
    for (int i = 0; i < n; i++) retired[i] = -1;
    struct sigaction sa = {0};
    sa.sa_handler = on_term;            /* no SA_RESTART: waitpid returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    for (int i = 0; i < n; i++) kids[i] = spawn1(i);
    int pending = 0;
    while (!stopping) {
        int st;
        pid_t p = waitpid(-1, &st, pending ? WNOHANG : 0);
        if (p == 0) {  /* nothing to reap: remove the old leaves now */
            remove_retired();
            pending = 0;
            continue;
        }
        if (p < 0) { if (errno == EINTR) continue; perror("waitpid"); sleep(1); continue; }
        for (int i = 0; i < n; i++)
            if (kids[i] == p) {
                if (stopping) { kids[i] = 0; break; }
                if (retired[i] >= 0) remove_retired();  /* one old leaf per child at most */
                retired[i] = (int)round_of[i];
                round_of[i]++;
                pending = 1;
                kids[i] = spawn1(i);
                break;
            }
    }
    for (int i = 0; i < n; i++) if (kids[i] > 0) kill(kids[i], SIGTERM);
    while (wait(NULL) > 0 || errno == EINTR) ;
    remove_retired();
    char p[4096];
    for (int i = 0; i < n; i++) {
        leaf_path(p, sizeof p, i, round_of[i]);
        rmdir(p);
    }
    rmdir(base);
    return 0;
}
