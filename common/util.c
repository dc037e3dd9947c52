/* util.c - clocks, address and number parsing. */
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sbn/status.h"

uint64_t sbn__now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t sbn__now_ms(void) { return sbn__now_ns() / 1000000u; }

int sbn__parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out) {
  if (s == NULL || *s < '0' || *s > '9')
    return SBN_EINVAL;
  errno = 0;
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v < min || v > max)
    return SBN_EINVAL;
  *out = v;
  return SBN_OK;
}

int sbn__parse_hostport(const char *s, char host[SBN_HOST_MAX + 1], int *port,
                        char *err, size_t errlen) {
  const char *colon, *hs = s;
  size_t hlen;
  if (s == NULL || *s == '\0') {
    snprintf(err, errlen, "empty address");
    return SBN_EINVAL;
  }
  if (*s == '[') {
    const char *close = strchr(s, ']');
    if (close == NULL) {
      snprintf(err, errlen, "address '%s' lacks a closing ']'", s);
      return SBN_EINVAL;
    }
    hs = s + 1;
    hlen = (size_t)(close - hs);
    colon = close[1] == ':' ? close + 1 : NULL;
    if (close[1] != '\0' && colon == NULL) {
      snprintf(err, errlen, "address '%s' has junk after ']'", s);
      return SBN_EINVAL;
    }
  } else {
    colon = strrchr(s, ':');
    if (colon != NULL && strchr(s, ':') != colon) {
      snprintf(err, errlen, "address '%s': write IPv6 hosts as [addr]:port", s);
      return SBN_EINVAL;
    }
    hlen = colon ? (size_t)(colon - s) : strlen(s);
  }
  if (hlen > SBN_HOST_MAX) {
    snprintf(err, errlen, "host in '%s' is longer than %d characters", s,
             SBN_HOST_MAX);
    return SBN_EINVAL;
  }
  if (colon != NULL) {
    uint64_t p;
    if (sbn__parse_u64(colon + 1, 0, 65535, &p) != SBN_OK) {
      snprintf(err, errlen, "port in '%s' is not a number from 0 to 65535", s);
      return SBN_EINVAL;
    }
    *port = (int)p;
  }
  if (hlen > 0) {
    memcpy(host, hs, hlen);
    host[hlen] = '\0';
  }
  return SBN_OK;
}

void sbn__format_ranks(const uint32_t *ranks, size_t n, char *buf, size_t len) {
  size_t off = 0;
  if (len == 0)
    return;
  buf[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    int k = snprintf(buf + off, len - off, i ? ",%u" : "%u", (unsigned)ranks[i]);
    if (k < 0 || (size_t)k >= len - off) {
      if (len >= 4)
        memcpy(buf + len - 4, "...", 4);
      return;
    }
    off += (size_t)k;
  }
}
