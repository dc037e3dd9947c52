/*
 * test_env.c - sbn_config_from_env(): sbn's variables, the launchers'
 * MASTER_ADDR/RANK/WORLD_SIZE and Slurm's, their precedence and errors.
 * Each test runs in its own forked process (Check's default), so setenv()
 * does not leak between tests.
 */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sbn/sbn.h"
#include "workers.h"

static void clear_env(void) {
  static const char *const vars[] = {
      "SBN_COORDINATOR", "MASTER_ADDR", "MASTER_PORT", "SBN_RANK", "RANK",
      "SLURM_PROCID", "SBN_WORLD_SIZE", "WORLD_SIZE", "SLURM_NTASKS", "SBN_JOB",
      "SLURM_JOB_ID", "SBN_TIMEOUT_MS", "SBN_CONNECT_TIMEOUT_MS", "SBN_SPIN_US", "SBN_GENERATION", NULL};
  for (int i = 0; vars[i]; i++)
    unsetenv(vars[i]);
}

START_TEST(test_defaults_untouched) {
  clear_env();
  sbn_config cfg;
  sbn_config_init(&cfg);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_OK);
  ck_assert_ptr_null(cfg.coordinator);
  ck_assert_int_eq(cfg.rank, 0);
  ck_assert_int_eq(cfg.world_size, 1);
  ck_assert_str_eq(cfg.job, "default");
}
END_TEST

START_TEST(test_sbn_variables) {
  clear_env();
  setenv("SBN_COORDINATOR", "10.0.0.5:4000", 1);
  setenv("SBN_RANK", "3", 1);
  setenv("SBN_WORLD_SIZE", "8", 1);
  setenv("SBN_JOB", "resnet", 1);
  setenv("SBN_TIMEOUT_MS", "1500", 1);
  setenv("SBN_SPIN_US", "50", 1);
  setenv("SBN_GENERATION", "18446744073709551615", 1);
  /* sbn's own variables win over the launchers'. */
  setenv("RANK", "5", 1);
  setenv("MASTER_ADDR", "elsewhere", 1);
  sbn_config cfg;
  sbn_config_init(&cfg);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_OK);
  ck_assert_str_eq(cfg.coordinator, "10.0.0.5:4000");
  ck_assert_int_eq(cfg.rank, 3);
  ck_assert_int_eq(cfg.world_size, 8);
  ck_assert_str_eq(cfg.job, "resnet");
  ck_assert_int_eq(cfg.timeout_ms, 1500);
  ck_assert_int_eq(cfg.spin_us, 50);
  ck_assert(cfg.generation == UINT64_MAX);
}
END_TEST

START_TEST(test_torchrun_convention) {
  clear_env();
  setenv("MASTER_ADDR", "node1", 1);
  setenv("MASTER_PORT", "29600", 1);
  setenv("RANK", "2", 1);
  setenv("WORLD_SIZE", "4", 1);
  sbn_config cfg;
  sbn_config_init(&cfg);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_OK);
  ck_assert_str_eq(cfg.coordinator, "node1:29600");
  ck_assert_int_eq(cfg.rank, 2);
  ck_assert_int_eq(cfg.world_size, 4);
  /* Without MASTER_PORT the default port is used; IPv6 gets brackets. */
  unsetenv("MASTER_PORT");
  setenv("MASTER_ADDR", "fe80::1", 1);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_OK);
  ck_assert_str_eq(cfg.coordinator, "[fe80::1]:29517");
}
END_TEST

START_TEST(test_slurm_convention) {
  clear_env();
  setenv("SLURM_PROCID", "7", 1);
  setenv("SLURM_NTASKS", "16", 1);
  setenv("SLURM_JOB_ID", "424242", 1);
  setenv("SBN_COORDINATOR", "head:29517", 1);
  sbn_config cfg;
  sbn_config_init(&cfg);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_OK);
  ck_assert_int_eq(cfg.rank, 7);
  ck_assert_int_eq(cfg.world_size, 16);
  ck_assert_str_eq(cfg.job, "424242");
}
END_TEST

START_TEST(test_bad_values_change_nothing) {
  static const char *const cases[][2] = {
      {"SBN_RANK", "-1"},          {"SBN_RANK", "3x"},
      {"SBN_WORLD_SIZE", "0"},     {"SBN_WORLD_SIZE", "65537"},
      {"WORLD_SIZE", ""},          {"MASTER_PORT", "70000"},
      {"SBN_COORDINATOR", "h:p"},  {"SBN_TIMEOUT_MS", "soon"},
      {"SBN_GENERATION", "-3"},    {"SBN_GENERATION", "18446744073709551616"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    clear_env();
    if (strcmp(cases[i][0], "MASTER_PORT") == 0)
      setenv("MASTER_ADDR", "node1", 1);
    setenv(cases[i][0], cases[i][1], 1);
    sbn_config cfg, before;
    sbn_config_init(&cfg);
    cfg.rank = 1;
    cfg.world_size = 2;
    before = cfg;
    int rc = sbn_config_from_env(&cfg);
    if (cases[i][1][0] == '\0') {
      ck_assert_int_eq(rc, SBN_OK); /* empty counts as unset */
      continue;
    }
    ck_assert_msg(rc == SBN_EINVAL, "%s=%s gave %d", cases[i][0], cases[i][1], rc);
    ck_assert_msg(strstr(sbn_last_error(), cases[i][0]) != NULL ||
                      strcmp(cases[i][0], "SBN_COORDINATOR") == 0,
                  "message '%s' does not name %s", sbn_last_error(), cases[i][0]);
    ck_assert(memcmp(&cfg, &before, sizeof(cfg)) == 0);
  }
}
END_TEST

START_TEST(test_limits_at_edge) {
  clear_env();
  char job[SBN_JOB_MAX + 1];
  memset(job, 'j', sizeof(job));
  job[SBN_JOB_MAX - 1] = '\0'; /* the longest accepted: SBN_JOB_MAX-1 bytes */
  setenv("SBN_JOB", job, 1);
  setenv("SBN_WORLD_SIZE", "65536", 1);
  setenv("SBN_RANK", "65535", 1);
  sbn_config cfg;
  sbn_config_init(&cfg);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_OK);
  ck_assert_int_eq(cfg.world_size, SBN_WORLD_MAX);
  job[SBN_JOB_MAX - 1] = 'j';
  job[SBN_JOB_MAX] = '\0';
  setenv("SBN_JOB", job, 1);
  ck_assert_int_eq(sbn_config_from_env(&cfg), SBN_EINVAL);
}
END_TEST

int main(void) {
  Suite *s = suite_create("env");
  TCase *tc = tcase_create("env");
  tcase_add_test(tc, test_defaults_untouched);
  tcase_add_test(tc, test_sbn_variables);
  tcase_add_test(tc, test_torchrun_convention);
  tcase_add_test(tc, test_slurm_convention);
  tcase_add_test(tc, test_bad_values_change_nothing);
  tcase_add_test(tc, test_limits_at_edge);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
