/* killall PIDFILE -- SIGTERM every pid in PIDFILE (whitespace-separated), one kill(2) after
 * another: a fresh sender for a supervisor's workers, to tell what in a stop comes from the
 * supervisor and what from its workers (bench/stop-ext.sh). Build: cc -O2 -o killall killall.c */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "r"); int pids[20000], n = 0;
    while (n < 20000 && fscanf(f, "%d", &pids[n]) == 1) n++;
    for (int i = 0; i < n; i++) kill(pids[i], SIGTERM);
    return 0;
}
