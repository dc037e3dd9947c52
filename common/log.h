/*
 * log.h - one line per event on stderr: "2026-11-24T17:10:26.123Z level msg".
 * The level threshold is process-wide; set it once at start-up.
 */
#ifndef SBN_LOG_H
#define SBN_LOG_H

enum sbn__log_level {
  SBN_LOG_ERROR = 0,
  SBN_LOG_WARN = 1,
  SBN_LOG_INFO = 2,
  SBN_LOG_DEBUG = 3
};

void sbn__log_set_level(int level);
int sbn__log_get_level(void);
/* Parses "error", "warn", "info", "debug"; returns -1 for anything else. */
int sbn__log_parse_level(const char *name);
void sbn__log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define SBN_LOGE(...) sbn__log(SBN_LOG_ERROR, __VA_ARGS__)
#define SBN_LOGW(...) sbn__log(SBN_LOG_WARN, __VA_ARGS__)
#define SBN_LOGI(...) sbn__log(SBN_LOG_INFO, __VA_ARGS__)
#define SBN_LOGD(...)                                                          \
  do {                                                                         \
    if (sbn__log_get_level() >= SBN_LOG_DEBUG)                                 \
      sbn__log(SBN_LOG_DEBUG, __VA_ARGS__);                                    \
  } while (0)

#endif /* SBN_LOG_H */
