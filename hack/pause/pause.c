/* The pod sandbox's process: it holds the pod's namespaces, reaps the
 * children it inherits, and exits on SIGTERM or SIGINT. The same job as
 * Kubernetes' own pause (build/pause/linux/pause.c), built here so that the
 * node needs no registry. scripts/node-up.sh compiles it with gcc -static. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction term = {.sa_handler = stop}, child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (getpid() != 1) write(2, "pause: not running as PID 1\n", 28);
  sigaction(SIGINT, &term, NULL);
  sigaction(SIGTERM, &term, NULL);
  sigaction(SIGCHLD, &child, NULL);
  for (;;) pause();
}
