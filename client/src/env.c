/*
 * env.c - sbn_config_from_env(): the environment conventions of sbn, of the
 * PyTorch-style launchers (MASTER_ADDR, RANK, WORLD_SIZE) and of Slurm.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "util.h"

/* Strings handed out through sbn_config live here until the next call. */
static _Thread_local char env_coordinator[SBN_HOST_MAX + 16];
static _Thread_local char env_job[SBN_JOB_MAX];
/* Longer paths than this are refused rather than truncated. */
#define SBN_SECRET_PATH_MAX 4096
static _Thread_local char env_secret_file[SBN_SECRET_PATH_MAX];

/* The first of names that is set and non-empty, or NULL; *which names it. */
static const char *first_env(const char *const *names, const char **which) {
  for (int i = 0; names[i] != NULL; i++) {
    const char *v = getenv(names[i]);
    if (v != NULL && v[0] != '\0') {
      *which = names[i];
      return v;
    }
  }
  return NULL;
}

/* Reads an integer variable from the first set of names into *out. */
static int env_int(const char *const *names, long long min, long long max, int *out) {
  const char *which;
  const char *v = first_env(names, &which);
  if (v == NULL)
    return SBN_OK;
  uint64_t x;
  if (sbn__parse_u64(v, (uint64_t)min, (uint64_t)max, &x) != SBN_OK)
    return sbn__fail(SBN_EINVAL, "environment variable %s='%s' is not a number in %lld..%lld",
                     which, v, min, max);
  *out = (int)x;
  return SBN_OK;
}

SBN_API int sbn_config_from_env(sbn_config *cfg) {
  static const char *const coord_names[] = {"SBN_COORDINATOR", NULL};
  static const char *const addr_names[] = {"MASTER_ADDR", NULL};
  static const char *const port_names[] = {"MASTER_PORT", NULL};
  static const char *const rank_names[] = {"SBN_RANK", "RANK", "SLURM_PROCID", NULL};
  static const char *const world_names[] = {"SBN_WORLD_SIZE", "WORLD_SIZE",
                                            "SLURM_NTASKS", NULL};
  static const char *const job_names[] = {"SBN_JOB", "SLURM_JOB_ID", NULL};
  static const char *const timeout_names[] = {"SBN_TIMEOUT_MS", NULL};
  static const char *const ctimeout_names[] = {"SBN_CONNECT_TIMEOUT_MS", NULL};
  static const char *const spin_names[] = {"SBN_SPIN_US", NULL};
  if (cfg == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_config_from_env needs a configuration");
  sbn_config next = *cfg;
  const char *which;
  int rc;
  if ((rc = env_int(rank_names, 0, SBN_WORLD_MAX - 1, &next.rank)) != SBN_OK ||
      (rc = env_int(world_names, 1, SBN_WORLD_MAX, &next.world_size)) != SBN_OK ||
      (rc = env_int(timeout_names, 0, INT32_MAX, &next.timeout_ms)) != SBN_OK ||
      (rc = env_int(ctimeout_names, 0, INT32_MAX, &next.connect_timeout_ms)) != SBN_OK ||
      (rc = env_int(spin_names, 0, 1000000, &next.spin_us)) != SBN_OK)
    return rc;
  const char *gen = getenv("SBN_GENERATION");
  if (gen != NULL && gen[0] != '\0' &&
      sbn__parse_u64(gen, 0, UINT64_MAX, &next.generation) != SBN_OK)
    return sbn__fail(SBN_EINVAL, "environment variable SBN_GENERATION='%s' is not a number",
                     gen);
  char host[SBN_HOST_MAX + 1];
  char err[200];
  int port = SBN_DEFAULT_PORT;
  const char *v = first_env(coord_names, &which);
  if (v != NULL) {
    if (sbn__parse_hostport(v, host, &port, err, sizeof(err)) != SBN_OK)
      return sbn__fail(SBN_EINVAL, "environment variable SBN_COORDINATOR: %s", err);
    if (strlen(v) >= sizeof(env_coordinator))
      return sbn__fail(SBN_EINVAL, "environment variable SBN_COORDINATOR is too long");
    snprintf(env_coordinator, sizeof(env_coordinator), "%s", v);
    next.coordinator = env_coordinator;
  } else if ((v = first_env(addr_names, &which)) != NULL) {
    if (strlen(v) > SBN_HOST_MAX)
      return sbn__fail(SBN_EINVAL, "environment variable MASTER_ADDR is longer than %d bytes",
                       SBN_HOST_MAX);
    if ((rc = env_int(port_names, 1, 65535, &port)) != SBN_OK)
      return rc;
    snprintf(env_coordinator, sizeof(env_coordinator), strchr(v, ':') ? "[%s]:%d" : "%s:%d",
             v, port);
    next.coordinator = env_coordinator;
  }
  if ((v = getenv("SBN_SECRET_FILE")) != NULL && v[0] != '\0') {
    if (strlen(v) >= sizeof(env_secret_file))
      return sbn__fail(SBN_EINVAL, "environment variable SBN_SECRET_FILE is longer than %d bytes",
                       SBN_SECRET_PATH_MAX - 1);
    snprintf(env_secret_file, sizeof(env_secret_file), "%s", v);
    next.secret_file = env_secret_file;
  }
  if ((v = first_env(job_names, &which)) != NULL) {
    if (strlen(v) >= SBN_JOB_MAX)
      return sbn__fail(SBN_EINVAL, "environment variable %s is longer than %d bytes", which,
                       SBN_JOB_MAX - 1);
    snprintf(env_job, sizeof(env_job), "%s", v);
    next.job = env_job;
  }
  *cfg = next;
  return SBN_OK;
}
