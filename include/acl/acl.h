/* AscendCL for FlexNPU: the one header a CANN program includes. Build against FlexNPU with
 *   gcc prog.c -I$(vdevctl shim --c-include) -L$(vdevctl shim --c-lib) -lascendcl
 * and run it under `vdevctl run`. Declarations written for FlexNPU from the public AscendCL reference
 * (hiascend.com CANN documentation: aclInit, aclFinalize, aclrtGetVersion); no text is copied. */
#ifndef INC_EXTERNAL_ACL_ACL_H_
#define INC_EXTERNAL_ACL_ACL_H_

#include "acl_base.h"
#include "acl_mdl.h"
#include "acl_op.h"
#include "acl_rt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The AscendCL interface version FlexNPU follows (pyACL's acl.get_version gives the same). */
#define ACL_MAJOR_VERSION 1
#define ACL_MINOR_VERSION 0
#define ACL_PATCH_VERSION 0

/* `configPath` may be NULL; FlexNPU reads nothing from it. */
ACL_FUNC_VISIBILITY aclError aclInit(const char *configPath);
ACL_FUNC_VISIBILITY aclError aclFinalize(void);
ACL_FUNC_VISIBILITY aclError aclrtGetVersion(int32_t *majorVersion, int32_t *minorVersion, int32_t *patchVersion);

#ifdef __cplusplus
}
#endif

#endif
