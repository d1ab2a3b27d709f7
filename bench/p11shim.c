/* A PKCS#11 pass-through module for benches and tests: forwards every call to a real module
 * (P11SHIM_MODULE, e.g. SoftHSM2) and
 *   - sleeps P11SHIM_DELAY_US microseconds in C_Sign and C_Decrypt calls that produce output
 *     (a network HSM's round trip; the length probe python-pkcs11 makes first stays local),
 *   - appends one line "C_Login 0x<rv>" per C_Login to P11SHIM_LOG (O_APPEND: one write per
 *     line, so several processes can count into one file),
 *   - while the file P11SHIM_FAULT exists, answers C_Sign, C_Decrypt, C_OpenSession and
 *     C_Login with the CK_RV written in it (hex), as a failing or vanished HSM would;
 *     P11SHIM_LOGIN_FAULT the same for C_Login alone (a PIN changed on the HSM).
 * Built by bench/p11shim.py with the system compiler against p11-kit's pkcs11.h.
 */
#define CRYPTOKI_GNU 1
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <p11-kit/pkcs11.h>

static struct ck_function_list shim;
static struct ck_function_list *real;
static long delay_us;

static void pause_for_latency(void) {
    if (delay_us > 0) {
        struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
}

static ck_rv_t fault_from(const char *variable) {
    const char *path = getenv(variable);
    if (path == NULL) return CKR_OK;
    FILE *f = fopen(path, "r");
    if (f == NULL) return CKR_OK;
    unsigned long rv = 0;
    if (fscanf(f, "%lx", &rv) != 1) rv = CKR_DEVICE_ERROR;
    fclose(f);
    return rv;
}

static ck_rv_t injected_fault(void) { return fault_from("P11SHIM_FAULT"); }

static void log_login(ck_rv_t rv) {
    const char *path = getenv("P11SHIM_LOG");
    if (path == NULL) return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0600);
    if (fd < 0) return;
    char line[64];
    int n = snprintf(line, sizeof line, "C_Login 0x%lx\n", (unsigned long)rv);
    if (write(fd, line, (size_t)n) != n) { /* a lost line shows up as a wrong count */ }
    close(fd);
}

static ck_rv_t shim_login(ck_session_handle_t s, ck_user_type_t user, unsigned char *pin,
                          unsigned long pin_len) {
    ck_rv_t rv = injected_fault();
    if (rv == CKR_OK) rv = fault_from("P11SHIM_LOGIN_FAULT");
    if (rv == CKR_OK) rv = real->C_Login(s, user, pin, pin_len);
    log_login(rv);
    return rv;
}

static ck_rv_t shim_open_session(ck_slot_id_t slot, ck_flags_t flags, void *app, ck_notify_t notify,
                                 ck_session_handle_t *session) {
    ck_rv_t rv = injected_fault();
    return rv != CKR_OK ? rv : real->C_OpenSession(slot, flags, app, notify, session);
}

static ck_rv_t shim_sign(ck_session_handle_t s, unsigned char *data, unsigned long len,
                         unsigned char *sig, unsigned long *sig_len) {
    ck_rv_t rv = injected_fault();
    if (rv != CKR_OK) return rv;
    if (sig != NULL) pause_for_latency();
    return real->C_Sign(s, data, len, sig, sig_len);
}

static ck_rv_t shim_decrypt(ck_session_handle_t s, unsigned char *data, unsigned long len,
                            unsigned char *out, unsigned long *out_len) {
    ck_rv_t rv = injected_fault();
    if (rv != CKR_OK) return rv;
    if (out != NULL) pause_for_latency();
    return real->C_Decrypt(s, data, len, out, out_len);
}

ck_rv_t C_GetFunctionList(struct ck_function_list **list) {
    if (list == NULL) return CKR_ARGUMENTS_BAD;
    if (real == NULL) {
        const char *path = getenv("P11SHIM_MODULE");
        if (path == NULL) return CKR_GENERAL_ERROR;
        void *so = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (so == NULL) return CKR_GENERAL_ERROR;
        ck_rv_t (*get)(struct ck_function_list **) =
            (ck_rv_t(*)(struct ck_function_list **))dlsym(so, "C_GetFunctionList");
        if (get == NULL || get(&real) != CKR_OK) return CKR_GENERAL_ERROR;
        const char *delay = getenv("P11SHIM_DELAY_US");
        delay_us = delay ? atol(delay) : 0;
        shim = *real;
        shim.C_Login = shim_login;
        shim.C_OpenSession = shim_open_session;
        shim.C_Sign = shim_sign;
        shim.C_Decrypt = shim_decrypt;
    }
    *list = &shim;
    return CKR_OK;
}
