// LD_PRELOAD=native_backtrace.so: on a fatal signal, prints the faulting thread's native
// stack (each frame as library(+offset) or symbol) to stderr, then lets the signal take its
// course. For the soaks of scripts/gpu_check.sh on machines without a debugger; Python's
// faulthandler, when enabled, prints the Python stacks first and then passes the signal on
// to this handler, which it finds installed as the previous one.
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void WriteText(const char* text) { (void)!write(2, text, strlen(text)); }

static void WriteHex(unsigned long value) {
  char digits[19] = "0x";
  for (int k = 0; k < 16; ++k) digits[2 + k] = "0123456789abcdef"[(value >> (60 - 4 * k)) & 15];
  digits[18] = '\0';
  WriteText(digits);
}

static void OnFatalSignal(int signal_number, siginfo_t* info, void* context) {
  (void)context;
  void* frames[64];
  const int count = backtrace(frames, 64);
  WriteText("\n*** native backtrace: signal ");
  WriteHex((unsigned long)signal_number);
  WriteText(" at address ");
  WriteHex((unsigned long)info->si_addr);
  WriteText(" ***\n");
  backtrace_symbols_fd(frames, count, 2);
  WriteText("*** end of native backtrace ***\n");
  signal(signal_number, SIG_DFL);
  raise(signal_number);
}

__attribute__((constructor)) static void InstallFatalSignalHandler(void) {
  void* first[1];
  backtrace(first, 1);  // loads the unwinder now: it may allocate, which a handler must not
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = OnFatalSignal;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  const int fatal_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
  for (unsigned k = 0; k < sizeof fatal_signals / sizeof fatal_signals[0]; ++k)
    sigaction(fatal_signals[k], &action, NULL);
}
