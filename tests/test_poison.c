/*
 * test_poison.c - poisoned statistics: contributions with NaN or Inf, a
 * negative M2, a negative (wrapped) or absurd count, and finite values whose
 * merge overflows, for forward, backward and allreduce.  Each fails its
 * round with SBN_EBADSTATS for every member, naming the rank (when one rank
 * is to blame) and the layer; the group carries on with the next seq.  Raw
 * peers speak to a real coordinator; the last test uses real workers.
 */
#include <check.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "raw_peer.h"
#include "sbn/sbn.h"
#include "workers.h"

#define C 3
#define TWO53 (UINT64_C(1) << 53)

static coord_proc coord;

static void start(void) {
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
}

static void stop(void) {
  int st = coord_stop(&coord, SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
}

static void send_contrib(rp *p, uint64_t seq, int phase, const char *layer, uint64_t count,
                         const double *a, const double *b, const float *f) {
  Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  m.seq = seq;
  m.phase = (Sbn__Phase)phase;
  m.layer = (char *)layer;
  m.channels = C;
  m.count = count;
  if (f != NULL) {
    m.fvals = (float *)f;
    m.n_fvals = C;
  } else {
    m.a = (double *)a;
    m.b = (double *)b;
    m.n_a = m.n_b = C;
  }
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &m;
  rp_send(p, &env);
}

/*
 * Rank 0 sends good values, rank 1 the given ones; both must get
 * SBN_EBADSTATS naming the layer, `who` (if not NULL) and `what`.
 */
static void expect_poisoned(rp **p, uint64_t seq, int phase, const char *layer, uint64_t count,
                            const double *a, const double *b, const float *f, const char *who,
                            const char *what) {
  static const double ga[C] = {1, 2, 3}, gb[C] = {1, 1, 1};
  static const float gf[C] = {1, 2, 3};
  send_contrib(p[0], seq, phase, layer, 4, ga, gb, f ? gf : NULL);
  send_contrib(p[1], seq, phase, layer, count, a, b, f);
  char quoted[64];
  snprintf(quoted, sizeof(quoted), "'%s'", layer);
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = rp_expect_error(p[r], SBN_EBADSTATS, quoted, RP_IO_TIMEOUT_MS);
    if (who)
      ck_assert_msg(strstr(e->error->message, who), "'%s' lacks '%s'", e->error->message, who);
    ck_assert_msg(strstr(e->error->message, what), "'%s' lacks '%s'", e->error->message, what);
    ck_assert_uint_eq(e->error->seq, seq);
    ck_assert_str_eq(e->error->layer, layer);
    if (who && strcmp(who, "rank 1") == 0)
      ck_assert(e->error->n_ranks == 1 && e->error->ranks[0] == 1);
    sbn__msg_free(e);
  }
}

START_TEST(forward_poison) {
  start();
  rp *p[2] = {rp_join(coord.port, "fwd", 0, 2), rp_join(coord.port, "fwd", 1, 2)};
  double nan_mean[C] = {0, NAN, 0}, inf_m2[C] = {0, 0, INFINITY}, neg_m2[C] = {1, -1e-3, 1};
  double one[C] = {1, 1, 1}, huge[C] = {-1e308, -1e308, -1e308}, big[C] = {1e308, 1e308, 1e308};
  uint64_t seq = 0;
  expect_poisoned(p, seq++, SBN__PHASE__PHASE_FORWARD, "bn.nan", 4, nan_mean, one, NULL, "rank 1",
                  "mean is not finite");
  expect_poisoned(p, seq++, SBN__PHASE__PHASE_FORWARD, "bn.inf", 4, one, inf_m2, NULL, "rank 1",
                  "M2 is not finite");
  expect_poisoned(p, seq++, SBN__PHASE__PHASE_FORWARD, "bn.neg", 4, one, neg_m2, NULL, "rank 1",
                  "M2 is negative");
  expect_poisoned(p, seq++, SBN__PHASE__PHASE_FORWARD, "bn.count", UINT64_MAX, one, one, NULL,
                  "rank 1", "-1 as a signed number");
  expect_poisoned(p, seq++, SBN__PHASE__PHASE_FORWARD, "bn.absurd", TWO53 + 1, one, one, NULL,
                  "rank 1", "larger than 2^53");
  /* Each count fits, their sum does not. */
  expect_poisoned(p, seq++, SBN__PHASE__PHASE_FORWARD, "bn.sum", TWO53 - 2, one, one, NULL,
                  "rank 1", "exceeds 2^53");
  /* Finite means 2e308 apart: the merged M2 overflows. */
  send_contrib(p[0], seq, SBN__PHASE__PHASE_FORWARD, "bn.ovf", 4, big, one, NULL);
  send_contrib(p[1], seq, SBN__PHASE__PHASE_FORWARD, "bn.ovf", 4, huge, one, NULL);
  for (int r = 0; r < 2; r++)
    sbn__msg_free(rp_expect_error(p[r], SBN_EBADSTATS, "overflow", RP_IO_TIMEOUT_MS));
  seq++;
  /* The group carries on. */
  send_contrib(p[0], seq, SBN__PHASE__PHASE_FORWARD, "bn.ok", 4, one, one, NULL);
  send_contrib(p[1], seq, SBN__PHASE__PHASE_FORWARD, "bn.ok", 4, one, one, NULL);
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = rp_recv(p[r], RP_IO_TIMEOUT_MS);
    ck_assert_int_eq(e->body_case, SBN__ENVELOPE__BODY_RESULT);
    ck_assert_uint_eq(e->result->count, 8);
    sbn__msg_free(e);
  }
  rp_close(p[0]);
  rp_close(p[1]);
  stop();
}
END_TEST

START_TEST(backward_poison) {
  start();
  rp *p[2] = {rp_join(coord.port, "bwd", 0, 2), rp_join(coord.port, "bwd", 1, 2)};
  double one[C] = {1, 1, 1}, nan_b[C] = {1, 1, NAN}, inf_a[C] = {-INFINITY, 1, 1};
  double big[C] = {DBL_MAX, 1, 1};
  expect_poisoned(p, 0, SBN__PHASE__PHASE_BACKWARD, "bn1", 0, one, nan_b, NULL, "rank 1",
                  "sum of dy*xhat is not finite");
  expect_poisoned(p, 1, SBN__PHASE__PHASE_BACKWARD, "bn2", 0, inf_a, one, NULL, "rank 1",
                  "sum of dy is not finite");
  /* DBL_MAX from each: finite inputs, an infinite sum. */
  send_contrib(p[0], 2, SBN__PHASE__PHASE_BACKWARD, "bn3", 0, big, one, NULL);
  send_contrib(p[1], 2, SBN__PHASE__PHASE_BACKWARD, "bn3", 0, big, one, NULL);
  for (int r = 0; r < 2; r++)
    sbn__msg_free(rp_expect_error(p[r], SBN_EBADSTATS, "overflow double", RP_IO_TIMEOUT_MS));
  rp_close(p[0]);
  rp_close(p[1]);
  stop();
}
END_TEST

START_TEST(allreduce_poison) {
  start();
  rp *p[2] = {rp_join(coord.port, "ar", 0, 2), rp_join(coord.port, "ar", 1, 2)};
  float inf_f[C] = {1, INFINITY, 1}, nan_f[C] = {NAN, 1, 1}, big[C] = {FLT_MAX, 1, 1};
  expect_poisoned(p, 0, SBN__PHASE__PHASE_ALLREDUCE, "grad.inf", 3, NULL, NULL, inf_f, "rank 1",
                  "not finite");
  expect_poisoned(p, 1, SBN__PHASE__PHASE_ALLREDUCE, "grad.nan", 3, NULL, NULL, nan_f, "rank 1",
                  "channel 0");
  expect_poisoned(p, 2, SBN__PHASE__PHASE_ALLREDUCE, "grad.count", UINT64_MAX, NULL, NULL, big,
                  "rank 1", "negative");
  /* FLT_MAX + FLT_MAX is finite in double, not once rounded to float. */
  send_contrib(p[0], 3, SBN__PHASE__PHASE_ALLREDUCE, "grad.ovf", 3, NULL, NULL, big);
  send_contrib(p[1], 3, SBN__PHASE__PHASE_ALLREDUCE, "grad.ovf", 3, NULL, NULL, big);
  for (int r = 0; r < 2; r++)
    sbn__msg_free(rp_expect_error(p[r], SBN_EBADSTATS, "overflows float32", RP_IO_TIMEOUT_MS));
  rp_close(p[0]);
  rp_close(p[1]);
  stop();
}
END_TEST

/* Real workers: rank 2 of 3 diverges (NaN) in layer "backbone.bn2". */
typedef struct poison_shared {
  int rc[WORKERS_MAX];
  char msg[WORKERS_MAX][512];
} poison_shared;

static int poison_worker(int rank, void *argp, void *sharedp) {
  poison_shared *sh = sharedp;
  sbn_ctx *ctx;
  if (worker_connect(argp, "poison", rank, 3, &ctx) != SBN_OK)
    return 1;
  double mean[4] = {1, 2, 3, 4}, m2[4] = {1, 1, 1, 1}, gm[4], gv[4], da[4], db[4];
  uint64_t gc;
  if (rank == 2)
    m2[3] = NAN;
  sh->rc[rank] = sbn_sync_stats(sbn_world(ctx), "backbone.bn2", 4, 8, mean, m2, &gc, gm, gv);
  snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "%s", sbn_last_error());
  /* The next round, with sane values, works. */
  m2[3] = 1;
  int rc = sbn_sync_sums(sbn_world(ctx), "backbone.bn2", 4, mean, m2, da, db);
  sbn_finalize(ctx);
  return rank == 2 ? 0 : rc != SBN_OK;
}

START_TEST(worker_diverges) {
  start();
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 3, poison_worker, coord.addr, sizeof(poison_shared)), 0);
  ck_assert_int_eq(workers_wait(&ws, 20000), 3);
  poison_shared *sh = ws.shared;
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(sh->rc[r] == SBN_EBADSTATS, "rank %d: %d %s", r, sh->rc[r], sh->msg[r]);
    ck_assert_msg(strstr(sh->msg[r], "rank 2") && strstr(sh->msg[r], "'backbone.bn2'") &&
                      strstr(sh->msg[r], "channel 3"),
                  "rank %d: '%s'", r, sh->msg[r]);
  }
  workers_release(&ws);
  stop();
}
END_TEST

int main(void) {
  Suite *s = suite_create("poison");
  TCase *tc = tcase_create("poison");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, forward_poison);
  tcase_add_test(tc, backward_poison);
  tcase_add_test(tc, allreduce_poison);
  tcase_add_test(tc, worker_diverges);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
