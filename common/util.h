/* util.h - small helpers shared by the coordinator and the client. */
#ifndef SBN_UTIL_H
#define SBN_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Monotonic clock in nanoseconds / milliseconds. */
uint64_t sbn__now_ns(void);
uint64_t sbn__now_ms(void);

/* The default coordinator port (documented in the README and --help). */
#define SBN_DEFAULT_PORT 29517
#define SBN_DEFAULT_HOST "127.0.0.1"
#define SBN_HOST_MAX 255

/*
 * Splits "HOST:PORT", "[V6]:PORT", "HOST" or ":PORT" into host (at most
 * SBN_HOST_MAX chars) and port; a missing part keeps the value passed in.
 * Returns SBN_OK or SBN_EINVAL with a message in err.
 */
int sbn__parse_hostport(const char *s, char host[SBN_HOST_MAX + 1], int *port,
                        char *err, size_t errlen);

/*
 * Parses a whole decimal unsigned number in [min, max]; SBN_OK or SBN_EINVAL.
 */
int sbn__parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out);

/* Formats members as "0,1,3" into buf (truncated with "..." if too long). */
void sbn__format_ranks(const uint32_t *ranks, size_t n, char *buf, size_t len);

#endif /* SBN_UTIL_H */
